"""The decode GEMV (energon/kernels/gemv.py and gemv_kernels.py) equals float64 matrix products.

The kernel runs here in Triton's interpreter on CPU (the `triton_interpreter` worker of
tests/conftest.py) on float16 inputs whose products are exact in float32 (small integers), so
the only rounding left is the final one to float16 and the result must equal float64 math
rounded once. The `gpu` tests run it compiled against cuBLAS and through the parallel layers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from energon.kernels.gemv import ENV_SWITCH, kernels_for, linear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (rows, out features, in features, block_n, block_k): ragged tiles on both sides, up to 16 rows
SHAPES = [(1, 40, 70, 16, 64), (3, 64, 256, 32, 128), (16, 33, 300, 16, 64), (8, 130, 96, 64, 32)]


def integer_case(rows, n, k, seed):
    """x, weight, bias of small integers (every product and partial sum exact in float32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 4, (rows, k), generator=g).half()
    weight = torch.randint(-3, 4, (n, k), generator=g).half()
    bias = torch.randint(-50, 51, (n,), generator=g).half()
    return x, weight, bias


def _gemv(cases):
    """Runs in the interpreter worker: gemv_kernels.gemv of each case."""
    from energon.kernels import gemv_kernels

    return [
        gemv_kernels.gemv(x, w, b, relu, block_n=bn, block_k=bk) for x, w, b, relu, bn, bk in cases
    ]


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_interpreted_gemv_equals_float64(triton_interpreter, with_bias, relu):
    cases, expected = [], []
    for i, (rows, n, k, bn, bk) in enumerate(SHAPES):
        x, w, b = integer_case(rows, n, k, seed=i)
        b = b if with_bias else None
        want = x.double() @ w.double().T + (b.double() if b is not None else 0)
        expected.append((want.clamp_min(0) if relu else want).half())
        cases.append((x, w, b, relu, bn, bk))
    for got, want in zip(triton_interpreter.apply(_gemv, (cases,)), expected, strict=True):
        assert got.dtype == torch.float16 and got.shape == want.shape
        assert torch.equal(got, want)


def test_gemv_refuses_a_negative_prefetch_depth():
    from energon.kernels import gemv_kernels

    x, w, _ = integer_case(1, 8, 8, seed=0)
    with pytest.raises(ValueError, match="prefetch_tiles must be >= 0"):
        gemv_kernels.gemv(x, w, pdl=True, prefetch_tiles=-1)


def test_gemv_refuses_more_rows_than_one_tile():
    from energon.kernels import gemv_kernels

    x, w, _ = integer_case(17, 8, 8, seed=0)
    with pytest.raises(ValueError, match="<= 16"):
        gemv_kernels.gemv(x, w)


def test_cpu_and_float32_inputs_stay_on_the_eager_ops():
    x, w, b = integer_case(2, 8, 8, seed=1)
    assert kernels_for(x, w, b) is None  # cpu
    assert torch.equal(linear(x.float(), w.float(), b.float(), relu=True),
                       F.relu(F.linear(x.float(), w.float(), b.float())))  # fmt: skip


# --- compiled, on the GPU ----------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_cuda_gemv_agrees_with_cublas(dtype, rows):
    torch.manual_seed(rows)
    for n, k in [(5120, 5120), (20480, 5120), (5120, 20480), (3840, 1280), (100, 72)]:
        x = torch.randn(rows, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5
        b = torch.randn(n, device="cuda", dtype=dtype)
        assert kernels_for(x, w, b) is not None
        for relu in (False, True):
            got = linear(x, w, b, relu=relu)
            want = x.double() @ w.double().T + b.double()
            want = want.clamp_min(0) if relu else want
            theirs = F.linear(x, w, b).double()
            theirs = theirs.clamp_min(0) if relu else theirs
            # both within a few units in the last place of the exact product
            tol = 4 * torch.finfo(dtype).eps * want.abs().clamp_min(1)
            assert ((got.double() - want).abs() <= tol).all()
            assert ((theirs - want).abs() <= tol).all()


@pytest.mark.gpu
@needs_cuda
def test_cuda_gemv_switch_and_large_batches_go_to_cublas(monkeypatch):
    x = torch.randn(17, 64, device="cuda", dtype=torch.float16)
    w = torch.randn(32, 64, device="cuda", dtype=torch.float16)
    assert kernels_for(x, w, None) is None  # more rows than one tile: a prefill or big batch
    assert kernels_for(x[:16], w, None) is not None
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert kernels_for(x[:16], w, None) is None


def chain(x, weights, norm_weight):
    """A decode layer's shape of kernels: norm, GEMV, GEMV (+ ReLU), GEMV, norm, GEMV; every
    GEMV reads what the kernel just before it wrote (the ones after a norm as dependent
    launches, the ones after a GEMV plainly)."""
    from energon.kernels.norm_kernels import norm_rows

    w1, w2, w3, w4 = weights
    h = norm_rows(x, norm_weight, None, 1e-5, rms=True)[0]
    h = linear(h, w1)
    h = linear(h, w2, relu=True)
    h = linear(h, w3)
    h = norm_rows(h, norm_weight, None, 1e-5, rms=True)[0]
    return linear(h, w4)


def graph_replays(run, inputs: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """run(x) captured in a CUDA graph over a static x of `rows` rows (warmed up outside the
    capture), replayed once for each input of that many rows, in order: the outputs."""
    static = torch.zeros_like(next(x for x in inputs if x.shape[0] == rows))
    run(static)  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(static)
    results = []
    for x in inputs:
        if x.shape[0] == rows:
            static.copy_(x)
            graph.replay()
            results.append(out.clone())
    return results


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="programmatic dependent launch needs sm_90",
)
def test_dependent_launches_replayed_from_a_graph_equal_plain_ones(monkeypatch):
    """Each GEMV may start before the kernel before it ends and waits for it only before reading
    x: replayed from a CUDA graph with fresh inputs each time, the chain must give the same bits
    as with ENERGON_PDL=0 (plain launches). A GEMV that read x before its wait would read the
    previous replay's values here."""
    from energon.kernels import PDL_SWITCH, dependent_launch
    from energon.kernels.gemv import TMA_SWITCH

    monkeypatch.setenv(TMA_SWITCH, "0")  # one or two rows on this kernel too: test_gemv_tma.py
    torch.manual_seed(0)
    dev, f16 = "cuda", torch.float16
    shapes = [(20480, 5120), (5120, 20480), (5120, 5120), (3840, 5120)]
    weights = [torch.randn(n, k, device=dev, dtype=f16) * k**-0.5 for n, k in shapes]
    norm_weight = torch.rand(5120, device=dev, dtype=f16) + 0.5
    inputs = [torch.randn(rows, 5120, device=dev, dtype=f16) for rows in (1, 1, 1, 4, 4)]
    assert dependent_launch(inputs[0].device)

    def run(x):
        return chain(x, weights, norm_weight)

    with_pdl = graph_replays(run, inputs, 1) + graph_replays(run, inputs, 4)
    eager_pdl = [chain(x, weights, norm_weight) for x in inputs]
    monkeypatch.setenv(PDL_SWITCH, "0")
    plain = [chain(x, weights, norm_weight) for x in inputs]
    assert all(map(torch.equal, eager_pdl, plain))
    assert all(map(torch.equal, with_pdl, plain))
    assert not all(torch.equal(plain[0], p) for p in plain[1:3])  # the inputs differ


def test_a_gemv_on_the_previous_gemvs_output_launches_plainly(monkeypatch):
    """`linear` launches the Triton GEMV as a dependent launch, except when x lies in the output
    of the GEMV just before (OPT's fc2 after fc1): that one waits for it to end."""
    from energon.kernels import gemv

    launches = []

    class Kernels:  # stands in for gemv_kernels: records each launch's pdl
        @staticmethod
        def gemv(x, weight, bias, relu, pdl):
            launches.append(pdl)
            return x @ weight.T

    monkeypatch.setattr(gemv, "kernels_for", lambda x, weight, bias: Kernels)
    monkeypatch.setattr(gemv, "dependent_launch", lambda device: True)
    w = torch.randn(6, 6)
    x = torch.randn(2, 6)
    h = linear(x, w)  # after a norm, say
    h = linear(h, w)  # on the GEMV's output
    linear(h[:, 2:4].contiguous(), w[:, :2])  # a copy: another kernel wrote it
    q = linear(x, w)
    linear(q[:, :3], w[:3, :3])  # a view into the previous GEMV's output
    assert launches == [True, False, True, True, False]
    monkeypatch.setattr(gemv, "dependent_launch", lambda device: False)  # ENERGON_PDL=0
    linear(x, w)
    assert launches[-1] is False
