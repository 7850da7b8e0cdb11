"""The sort-free truncation kernel (energon/kernels/truncation_kernels.py) removes what the
Sampler's eager temperature / top-k / top-p / min-p ops remove, and keeps a top-p boundary's tie
group whole.

The kernel runs in Triton's interpreter on CPU (the `triton_interpreter` worker of
tests/conftest.py); the `gpu` tests run it compiled, alone and inside the Sampler.
"""

from __future__ import annotations

import math

import pytest
import torch

from energon.sampler import _top_k_top_p, apply_min_p

OFF_K, OFF_P = None, float("inf")


def table_of(vocab: int, rows: list[tuple]) -> torch.Tensor:
    """[4, rows] as the Sampler builds it from (temperature, top_k or None, top_p, min_p)."""
    temperature = [r[0] for r in rows]
    top_k = [float(vocab if r[1] is None else min(r[1], vocab)) for r in rows]
    return torch.tensor([temperature, top_k, [r[2] for r in rows], [r[3] for r in rows]])


def eager(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """What the Sampler's eager ops make of x."""
    out = x.div(table[0].unsqueeze(-1))
    _top_k_top_p(out, table[1].long(), table[2])
    return apply_min_p(out, table[3])


def cases():
    """(x, table, flags) of random rows: vocabularies below, at and past a block, -inf entries
    (a ban), each rule alone and together, off in some rows."""
    g = torch.Generator().manual_seed(11)
    out = []
    for vocab in (37, 512, 1300):
        rows = [
            (0.8, OFF_K, 0.9, 0.0),
            (1.0, 50, OFF_P, 0.0),
            (1.3, 5, 0.7, 0.1),
            (0.5, OFF_K, 0.5, 0.05),
            (0.7, 200, 0.95, 0.0),
            (2.0, 1, 0.3, 0.2),
            (1.0, OFF_K, OFF_P, 0.3),
            (0.9, 3, 0.999, 0.0),
        ]
        x = torch.randn(len(rows), vocab, generator=g) * 3
        x[0, :5] = float("-inf")
        table = table_of(vocab, rows)
        out.append((x, table, (True, True, True)))
        # one rule on in every row, the flags leaving the others out
        for flag in range(3):
            t = table_of(vocab, [(r[0], r[1], OFF_P, 0.0) for r in rows])
            if flag == 1:
                t = table_of(vocab, [(r[0], OFF_K, r[2], 0.0) for r in rows])
            if flag == 2:
                t = table_of(vocab, [(r[0], OFF_K, OFF_P, r[3]) for r in rows])
            out.append((x, t, tuple(i == flag for i in range(3))))
    return out


def _truncated(calls):
    """Runs in the interpreter worker: truncate on a copy of each x."""
    from energon.kernels import truncation_kernels

    done = []
    for x, table, flags in calls:
        y = x.clone()
        truncation_kernels.truncate(y, table, *flags)
        done.append(y)
    return done


def test_interpreted_kernel_removes_what_the_eager_ops_remove(triton_interpreter):
    calls = cases()
    for got, (x, table, _) in zip(
        triton_interpreter.apply(_truncated, (calls,)), calls, strict=True
    ):
        want = eager(x, table)
        assert torch.equal(got.isneginf(), want.isneginf())
        assert torch.equal(got, want)  # the survivors are x / temperature, bit for bit


def test_interpreted_kernel_keeps_ties_at_top_k_and_a_top_p_tie_group_whole(triton_interpreter):
    # probabilities 0.534, 0.197, 0.197, 0.072: top_p 0.6 is reached inside the tie group
    x = torch.tensor([[2.0, 1.0, 1.0, 0.0]] * 2)
    table = table_of(4, [(1.0, OFF_K, 0.6, 0.0), (1.0, 2, OFF_P, 0.0)])
    [got] = triton_interpreter.apply(_truncated, ([(x, table, (True, True, False))],))
    assert got[0].isfinite().tolist() == [True, True, True, False]  # the whole tie group
    assert eager(x, table)[0].isfinite().tolist() == [True, True, False, False]  # index order
    # top_k 2 keeps both tokens tied with the second largest, as the eager ops do
    assert got[1].isfinite().tolist() == [True, True, True, False]
    assert torch.equal(got[1], eager(x, table)[1])
    # the kept set's probability reaches p, and without the tie group it would not
    probs = [math.exp(v) / sum(math.exp(u) for u in x[0].tolist()) for v in x[0].tolist()]
    assert sum(probs[:3]) >= 0.6 > probs[0]


def test_truncate_refuses_a_table_of_another_shape():
    pytest.importorskip("triton")
    from energon.kernels import truncation_kernels

    x = torch.zeros(3, 10)
    with pytest.raises(ValueError, match=r"table must be a contiguous \[4, 3\] tensor"):
        truncation_kernels.truncate(x, torch.zeros(4, 2), True, True, True)
    with pytest.raises(ValueError, match="float32 logits"):
        truncation_kernels.truncate(x.half(), torch.zeros(4, 3), True, True, True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_kernel_removes_what_the_eager_ops_remove_without_a_host_sync():
    from energon.kernels import truncation_kernels

    calls = cases()
    g = torch.Generator().manual_seed(3)
    vocab = 50272  # opt-13b's, past any block
    rows = [(0.8, OFF_K, 0.9, 0.0), (1.0, 50, 0.95, 0.0), (0.6, 1000, 0.5, 0.05)] * 22
    calls.append((torch.randn(len(rows), vocab, generator=g) * 4, table_of(vocab, rows), (1, 1, 1)))
    for x, table, flags in calls:
        y, t = x.cuda(), table.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            truncation_kernels.truncate(y, t, *map(bool, flags))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert torch.equal(y.cpu(), eager(x, table))
