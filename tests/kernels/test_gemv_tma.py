"""The Gluon TMA GEMV (energon/kernels/gemv_tma.py): where `linear` sends a call, what its sm_90
code does before waiting for the kernel before it, and (on a GPU) its results against float64.

The PTX test compiles for an H100/H200 on this machine (no GPU needed): the weights' TMA copies
come before `griddepcontrol.wait`, the copies of x after it, and nothing else is read before it.
"""

from __future__ import annotations

import re

import pytest
import torch

from energon.kernels import gemv
from tests.kernels.test_chain import LOAD, RELEASE, WAIT, _first
from tests.kernels.test_gemv import graph_replays

needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="TMA and programmatic dependent launches need sm_90",
)
COPY = "cp.async.bulk.tensor"


def _ptx(push: bool = False) -> list[str]:
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from energon.kernels import gemv_tma, one_shot_norm

    layout = gemv_tma._layout(16)
    x, w = torch.zeros(1, 5120, dtype=torch.float16), torch.zeros(7680, 5120, dtype=torch.float16)
    descs = [
        TensorDescriptor.from_tensor(x, [1, gemv_tma.BLOCK_K], layout),
        TensorDescriptor.from_tensor(w, [gemv_tma.BLOCK_N, gemv_tma.BLOCK_K], layout),
    ]
    signature = dict(zip(("x_desc", "w_desc"), map(mangle_type, descs), strict=True))
    signature |= dict(Bias="*fp16", Y="*fp16")
    signature |= dict.fromkeys(("M", "N", "K", "stride_ym", "tiles", "per_program", "early"), "i32")
    signature |= dict(peers="i64", push_offset="i32")
    constants = dict(HAS_BIAS=not push, RELU=False, PDL=True, STAGES=gemv_tma.STAGES)
    constants |= dict(PUSH=push, RANK=1 if push else 0, WORLD=2 if push else 1)
    constants |= dict(HALF=one_shot_norm.half_bytes(2), ROW=one_shot_norm.ROW_BYTES)
    constants |= dict(ROWS=one_shot_norm.MAX_ROWS)
    source = GluonASTSource(
        gemv_tma._gemv_tma_kernel, {**signature, **dict.fromkeys(constants, "constexpr")}, constants
    )
    options = {"num_warps": gemv_tma.NUM_WARPS, "num_stages": 1}
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    except RuntimeError as exc:  # a triton built without its CUDA back end
        pytest.skip(f"no sm_90 compiler here: {exc}")
    return compiled.asm["ptx"].splitlines()


def _copies(lines: list[str]) -> list[str]:
    """The tensor map (a kernel parameter's address register) of each TMA copy in `lines`."""
    return [re.search(r"\], \[(%rd\d+),", line)[1] for line in lines if COPY in line]


def test_the_weights_stream_before_the_wait_and_x_comes_after_it():
    from energon.kernels.gemv_tma import STAGES

    ptx = _ptx()
    wait, release = _first(ptx, re.escape(WAIT)), _first(ptx, re.escape(RELEASE))
    assert wait < release
    before, after = _copies(ptx[:wait]), _copies(ptx[release:])
    # one weight copy a ring slot before the wait, all through the same tensor map
    assert len(before) == STAGES and len(set(before)) == 1
    weights = before[0]
    # after it: the copies of x into every slot (another map) beside the weight copies of the
    # slots left for after the wait (`early`), then the loop's refills of both
    x_maps = set(after) - {weights}
    assert len(x_maps) == 1 and after[: 2 * STAGES].count(x_maps.pop()) == STAGES
    assert weights in after[2 * STAGES :]
    # and no other read before the kernel before has finished
    assert not [line for line in ptx[:wait] if LOAD.search(line) and COPY not in line]


def test_a_pushing_gemv_stores_to_the_ranks_only_after_the_wait():
    """With `push` the epilogue also stores each tile into both ranks' slots (addresses read
    from the table, after the wait, like every store)."""
    plain, ptx = _ptx(), _ptx(push=True)
    wait = _first(ptx, re.escape(WAIT))
    stores = [line for line in ptx if re.search(r"\bst\.global", line)]
    assert len(stores) > len([line for line in plain if re.search(r"\bst\.global", line)])
    assert not [line for line in ptx[:wait] if re.search(r"\bst\.global", line)]


def test_linear_sends_one_or_two_rows_to_it_only_with_dependent_launches(monkeypatch):
    """`tma_kernels_for` decides before importing anything: more rows, no dependent launches
    (before Hopper, ENERGON_PDL=0) or ENERGON_GEMV_TMA=0 keep the call on gemv_kernels."""
    imported = []
    module = type("Module", (), {"takes": staticmethod(lambda x, w: True)})
    monkeypatch.setattr(gemv, "dependent_launch", lambda device: True)
    monkeypatch.setattr(gemv, "triton_module", lambda name: imported.append(name) or module)
    w = torch.randn(8, 16)
    assert gemv.tma_kernels_for(torch.randn(gemv.TMA_ROWS, 16), w) is module
    assert gemv.tma_kernels_for(torch.randn(gemv.TMA_ROWS + 1, 16), w) is None
    monkeypatch.setenv(gemv.TMA_SWITCH, "0")
    assert gemv.tma_kernels_for(torch.randn(1, 16), w) is None
    monkeypatch.delenv(gemv.TMA_SWITCH)
    monkeypatch.setattr(gemv, "dependent_launch", lambda device: False)
    assert gemv.tma_kernels_for(torch.randn(1, 16), w) is None
    assert imported == ["gemv_tma"]


def test_a_kernel_that_fails_before_its_first_success_gives_way_to_the_triton_gemv(monkeypatch):
    """A triton whose Gluon the kernel does not compile with: the first call falls back to the
    Triton GEMV, says why once, and no later call tries again; a failure after a success is
    raised."""
    tries, launches = [], []

    class Broken:
        @staticmethod
        def gemv(x, weight, bias, relu, pdl, push=None):
            tries.append(1)
            raise RuntimeError("no such Gluon op")

    class Kernels:  # stands in for gemv_kernels
        @staticmethod
        def gemv(x, weight, bias, relu, pdl):
            launches.append(pdl)
            return x @ weight.T

    monkeypatch.setattr(gemv, "kernels_for", lambda x, weight, bias: Kernels)
    monkeypatch.setattr(gemv, "tma_kernels_for", lambda x, weight: Broken)
    monkeypatch.setattr(gemv, "dependent_launch", lambda device: True)
    monkeypatch.setattr(gemv.EarlyWeights, "calls", 0)
    monkeypatch.setattr(gemv.EarlyWeights, "error", None)
    x, w = torch.randn(1, 6), torch.randn(4, 6)
    for _ in range(3):
        assert torch.equal(gemv.linear(x, w, early_weights=True), x @ w.T)
    assert len(tries) == 1 and len(launches) == 3
    assert gemv.EarlyWeights.error == "RuntimeError: no such Gluon op"
    monkeypatch.setattr(gemv.EarlyWeights, "error", None)
    monkeypatch.setattr(gemv.EarlyWeights, "calls", 5)  # it ran before
    with pytest.raises(RuntimeError, match="no such Gluon op"):
        gemv.linear(x, w, early_weights=True)


def test_only_tensor_parallel_layers_ask_for_early_weights(monkeypatch):
    """A tp > 1 layer's GEMVs follow all-reduces: they ask `linear` to stream early; at tp=1
    (norms and attention before them) they do not."""
    from energon.parallel import layers

    asked = []

    def linear(x, weight, bias=None, relu=False, early_weights=False):
        asked.append(early_weights)
        return x @ weight.T

    monkeypatch.setattr(layers, "linear", linear)
    column = layers.ColumnParallelLinear(8, 6)
    row = layers.RowParallelLinear(6, 8, bias=False)
    for lin in (column, row):
        torch.nn.init.normal_(lin.weight)
    x = torch.randn(1, 8)
    column(x), row(x[:, :6]), layers.merged(x, column)
    assert asked == [False, False, False]
    column.tp_size = row.tp_size = 2  # as a rank of a tp=2 group holds them
    column(x), row(x[:, :6]), layers.merged(x, column)
    assert asked[3:] == [True, True, True]


def integer_case(rows, n, k, dtype, seed):
    """x, weight, bias of small integers on the GPU: every product and partial sum is exact in
    float32, so the result must equal float64 math rounded once to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    x, weight = (torch.randint(-3, 4, shape, generator=g) for shape in ((rows, k), (n, k)))
    bias = torch.randint(-50, 51, (n,), generator=g)
    return [t.to("cuda", dtype) for t in (x, weight, bias)]


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_tma_gemv_equals_float64_rounded_once(dtype):
    from energon.kernels import gemv_tma

    # ragged tiles on both sides, a program with several tiles (N past 32 x the SMs), K past
    # the ring (more steps than slots) and shorter than one slot
    shapes = [(1, 40, 72), (2, 7680, 5120), (1, 5120, 20480), (2, 33, 296), (1, 10240 + 8, 1280)]
    for i, (rows, n, k) in enumerate(shapes):
        x, w, b = integer_case(rows, n, k, dtype, seed=i)
        for bias, relu in ((None, False), (b, False), (b, True)):
            want = x.double() @ w.double().T + (bias.double() if bias is not None else 0)
            want = (want.clamp_min(0) if relu else want).to(dtype)
            got = gemv_tma.gemv(x, w, bias, relu, pdl=False)
            assert torch.equal(got, want), (rows, n, k, bias is not None, relu)
        for early in (0, 3):  # slots filled before the wait; the rest after it
            got = gemv_tma.gemv(x, w, b, pdl=False, early=early)
            assert torch.equal(got, (x.double() @ w.double().T + b.double()).to(dtype))
    with pytest.raises(ValueError, match="gemv_tma takes"):
        gemv_tma.gemv(torch.zeros(3, 64, device="cuda", dtype=dtype), w[:, :64])


def layer(x, weights, norm_weight, apart=False):
    """A decode layer's chain on the TMA GEMV: norm, GEMV, GEMV + ReLU, GEMV, norm, GEMV;
    `apart`: the device finishes each kernel before the next is launched."""
    from energon.kernels.norm_kernels import norm_rows

    def then(out):
        if apart:
            torch.cuda.synchronize()
        return out

    w1, w2, w3, w4 = weights
    h = then(norm_rows(then(x), norm_weight, None, 1e-5, rms=True)[0])
    h = then(gemv.linear(then(gemv.linear(h, w1)), w2, relu=True))
    h = then(norm_rows(then(gemv.linear(h, w3)), norm_weight, None, 1e-5, rms=True)[0])
    return then(gemv.linear(h, w4))


@pytest.mark.gpu
@needs_hopper
def test_replayed_from_a_graph_it_reads_x_only_after_the_kernel_before_wrote_it():
    """Every TMA GEMV of the chain starts early and copies its weights while the kernel before
    runs; replayed from a CUDA graph with fresh inputs, the results must equal the same calls
    made one at a time with the device idle in between (nothing overlaps there). A GEMV that
    copied x before its wait would see the previous replay's values."""
    torch.manual_seed(0)
    dev, f16 = "cuda", torch.float16
    shapes = [(20480, 5120), (5120, 20480), (5120, 5120), (3840, 5120)]
    weights = [torch.randn(n, k, device=dev, dtype=f16) * k**-0.5 for n, k in shapes]
    norm_weight = torch.rand(5120, device=dev, dtype=f16) + 0.5
    inputs = [torch.randn(rows, 5120, device=dev, dtype=f16) for rows in (1, 1, 2, 2)]
    x = torch.randn(1, 5120, device=dev, dtype=f16)
    assert gemv.tma_kernels_for(x, weights[0]) is not None

    def run(x):
        return layer(x, weights, norm_weight)

    graphs = graph_replays(run, inputs, 1) + graph_replays(run, inputs, 2)
    alone = [layer(x, weights, norm_weight, apart=True) for x in inputs]
    assert all(map(torch.equal, graphs, alone))
    assert not torch.equal(alone[0], alone[1])  # the inputs differ


@pytest.mark.gpu
@needs_hopper
def test_a_pushing_gemv_puts_its_rows_into_every_ranks_slot_for_their_next_call():
    """`push`: rank 1 of 2 (both regions on this GPU) stores each row of its product into its
    slot for the row on both ranks, in the half of the row's next call (by its own counts);
    its result is the plain GEMV's."""
    from energon.kernels import gemv_tma
    from energon.kernels import one_shot_norm as k

    world, rank, offset = 2, 1, 48
    size = offset + k.region_bytes(world)
    buffers = [torch.zeros(size, dtype=torch.uint8, device="cuda") for _ in range(world)]
    for buffer in buffers:
        k.prepare_region(buffer, offset, world)
    table = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device="cuda")
    counts = buffers[rank][offset + 2 * k.half_bytes(world) :].view(torch.int32)
    counts[:2] = torch.tensor([1, 6])  # next calls: row 0's second (half 0), row 1's 7th (1)
    x, w, _ = integer_case(2, 5120 + 32, 2560, torch.float16, seed=3)
    push = k.Push(table.data_ptr(), rank, world, offset)
    y = gemv_tma.gemv(x, w, pdl=False, push=push)
    assert torch.equal(y, (x.double() @ w.double().T).half())
    width = y.shape[1]
    for buffer in buffers:
        halves = buffer[offset : offset + 2 * k.half_bytes(world)].view(torch.int16)
        for row, half in ((0, 0), (1, 1)):
            start = (half * k.half_bytes(world) + (rank * k.MAX_ROWS + row) * k.ROW_BYTES) // 2
            assert torch.equal(halves[start : start + width], y[row].view(torch.int16))
            halves[start : start + width] = -32768
        assert bool((halves == -32768).all())  # nothing else written
    with pytest.raises(ValueError, match="cannot push"):
        gemv_tma.gemv(x.float(), w.float(), push=push)
