"""Greedy tokens (energon/kernels/argmax.py): the Triton argmax against torch.argmax, in Triton's
interpreter on CPU (one spawned worker, tests/conftest.py) and compiled on CUDA (`gpu`, also
captured in a CUDA graph)."""

from __future__ import annotations

import pytest
import torch

from energon.kernels import argmax as argmax_module

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cases(device="cpu") -> list[torch.Tensor]:
    """Rows torch.argmax answers in ways a kernel could get wrong: widths past one piece and
    not a multiple of it, the largest value tied within a piece and across pieces, -inf
    everywhere, NaNs (the first wins, before any larger number), fp16 and fp32."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 50272, generator=g)
    wide[0, 7] = wide[0, 40000] = 9.0  # a tie across pieces: the first
    wide[1, 8191] = wide[1, 8192] = 9.0  # either side of a piece's edge
    wide[2, 100] = 5.0
    wide[2, 30000] = float("nan")
    wide[2, 40000] = float("nan")
    small = torch.randn(4, 37, generator=g)
    small[1] = float("-inf")
    small[2, 3] = small[2, 5] = 50.0
    small[3, :] = 1.0
    one = torch.randn(1, 8193, generator=g)
    return [t.to(device) for t in (wide, wide.half(), small, small.half(), one, one[:, :25136])]


def _interpreted(cases: list[torch.Tensor]) -> list[torch.Tensor]:
    from energon.kernels.argmax_kernels import argmax_rows

    return [argmax_rows(x) for x in cases]


def test_the_interpreted_kernel_gives_torch_argmax(triton_interpreter):
    cases = _cases()
    got = triton_interpreter.apply(_interpreted, (cases,))
    for x, tokens in zip(cases, got, strict=True):
        assert tokens.dtype == torch.int64
        assert torch.equal(tokens, x.argmax(dim=-1)), (x.shape, x.dtype)


def _refusals() -> list[str]:
    from energon.kernels.argmax_kernels import argmax_rows

    said = []
    for bad in (torch.zeros(2, 3)[:, ::2], torch.zeros(4), torch.zeros(2, 0)):
        try:
            argmax_rows(bad)
        except ValueError as exc:
            said.append(str(exc))
    return said


def test_the_kernel_refuses_what_it_cannot_read(triton_interpreter):
    said = triton_interpreter.apply(_refusals, ())
    assert len(said) == 3 and all("argmax_rows" in s for s in said)


def test_off_cuda_it_is_torch_argmax():
    x = torch.randn(5, 300)
    assert torch.equal(argmax_module.argmax(x), x.argmax(dim=-1))


@pytest.mark.gpu
@needs_cuda
def test_the_compiled_kernel_gives_torch_argmax_also_in_a_graph():
    from energon.kernels.argmax_kernels import argmax_rows

    for x in _cases("cuda"):
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1)), (x.shape, x.dtype)
    x = torch.randn(2, 50272, device="cuda", dtype=torch.float16)
    argmax_rows(x)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = argmax_rows(x)
    for seed in range(3):
        x.copy_(torch.randn(2, 50272, generator=torch.Generator().manual_seed(seed)))
        graph.replay()
        assert torch.equal(tokens, x.argmax(dim=-1))


@pytest.mark.parametrize("dtype", ["*fp16", "*bf16", "*fp32"])
def test_the_sm90_kernel_reads_the_logits_only_after_the_head_has_finished(dtype):
    """Compiled for an H100/H200 here (no GPU needed; triton 3.6, the GPU image's, refused an
    earlier version whose combine reused a scalar's name for a vector): as a dependent launch
    after the LM head it loads nothing before its wait."""
    from energon.kernels import argmax_kernels
    from tests.kernels.test_chain import RELEASE, WAIT, _first, _loads_before_wait, _ptx

    signature = dict(X=dtype, Out="*i64", PartValue="*fp32", PartIndex="*i32", Tickets="*i32")
    signature |= dict(width="i32", stride="i32")
    constants = dict(CHUNK=argmax_kernels.CHUNK, PIECES=16, PDL=True)
    ptx = _ptx(argmax_kernels._argmax_kernel, signature, constants, argmax_kernels.NUM_WARPS, 3)
    assert _first(ptx, WAIT) < _first(ptx, RELEASE)
    assert _loads_before_wait(ptx) == []
