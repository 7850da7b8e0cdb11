"""The decode GEMV whose weights start streaming before the kernel before it ends (Gluon, Hopper).

`gemv_kernels`' Triton GEMV may start while the kernel before it still runs (a programmatic
dependent launch), but its pipelined weight loads are issued only after its wait: Triton puts a
loop's prologue right before the loop. So at tp=2 the HBM idles through both fused all-reduce +
norms of a layer (5-6 us each) and its paged attention (10 us): a fifth of a decode step
(docs/benchmarks.md, "Engine generation"). Here every program fills a ring of STAGES
shared-memory slots with its first weight tiles by TMA before it waits, so a GEMV behind a
latency-bound kernel finds up to ~20 MB (STAGES x a tile x its programs) already on chip when
its input is ready.

Work: the output features are cut into tiles of BLOCK_N rows; each program takes `per_program`
consecutive tiles (the launch picks the fewest programs that keep every program's share equal,
at most one a SM), walking each tile's K in BLOCK_K steps through one ring that runs on across
its tiles. A slot holds a weight tile [BLOCK_N, BLOCK_K] and the matching x tile
[BLOCK_M, BLOCK_K] (TMA pads rows past M and columns past K with zeros), both counted on one
mbarrier: the weight copy is issued before the wait, the x copy after it. The products are
kept per thread in fp32 on the CUDA cores (a row or two of x leaves the tensor cores nothing
to do) and summed across the warp once a tile; bias and ReLU in the epilogue, as in
`gemv_kernels`.

What it buys and costs (2x H200, opt-13b at tp=2, a profiled decode step charged kernel by
kernel): q/k/v 17.4 against 20.8 us, out_proj 7.0 against 8.7, fc1 25.0 against 29.5, fc2 27.0
against 27.2; the latency-bound kernels its early stream runs beside take longer, the fused
all-reduce + norm 6.9-8.2 against 4.9-6.2 us and the attention 11.1 against 10.0: 4.7 us a
layer net, 4.30 against 4.46 ms a token. At tp=1 the attention lost more than the GEMVs gained,
so only tensor-parallel layers use it (energon.kernels.gemv.linear's `early_weights`).

A row-parallel layer's GEMV may also push each finished tile of its float16 product into every
rank's slots of the fused all-reduce + norm that will sum it (`push`; one_shot_norm.py): the
rows cross NVLink while the GEMV's other programs still stream, instead of after the GEMV ends.

Imported only on CUDA (energon.kernels.triton_module); compiled for sm_90 on CPU by
tests/kernels/test_gemv_tma.py.
"""

from __future__ import annotations

import functools
import os

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from energon.kernels import one_shot_norm, sm_count
from energon.kernels.chain import launch_options, wait_then_release
from energon.kernels.gemv import TMA_ROWS
from energon.kernels.one_shot_norm import SENTINEL

# triton 3.6 (the GPU image) names the TMA load async_copy_global_to_shared; 3.9 async_load
# and its CTA barrier thread_barrier; 3.9 barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

MAX_ROWS = TMA_ROWS  # rows of x this kernel takes; more go to gemv_kernels
BLOCK_N = 32  # output features a tile (16 and 8 lost 3-40 us a call on an H200; again where
# they spread a K-heavy shape over more SMs: docs/benchmarks.md, "row-parallel GEMVs push")
BLOCK_K = 256  # input features a step: one 512-byte row of a tile per warp load
RING_BYTES = 160 << 10  # weights a program keeps in flight (its ring's slots)
STAGES = RING_BYTES // (BLOCK_N * BLOCK_K * 2)  # ring slots (fp16 / bf16 tiles)
NUM_WARPS = 4  # (8 were 0.4-6 us slower a call, but on the K-heavy shapes at tp=2)


@gluon.jit
def _load_weights(w_desc, x_desc, ready, w_ring, slot, step, first, steps_k, live):
    """Ring step `step` (tile first + step // steps_k, K step step % steps_k): its weight tile
    into `slot`, the slot's mbarrier told to expect it and the x tile."""
    rows: gl.constexpr = w_desc.block_type.shape[0]
    bytes_: gl.constexpr = w_desc.block_type.nbytes + x_desc.block_type.nbytes
    mbarrier.expect(ready.index(slot), bytes_, pred=live)
    tile = first + step // steps_k
    k = (step % steps_k) * w_desc.block_type.shape[1]
    _tma_load(w_desc, [tile * rows, k], ready.index(slot), w_ring.index(slot), pred=live)


@gluon.jit
def _load_x(x_desc, ready, x_ring, slot, step, steps_k, live):
    """Ring step `step`'s x tile into `slot` (counted on the mbarrier `_load_weights` armed)."""
    k = (step % steps_k) * x_desc.block_type.shape[1]
    _tma_load(x_desc, [0, k], ready.index(slot), x_ring.index(slot), pred=live)


@gluon.jit
def _gemv_tma_kernel(
    x_desc,
    w_desc,
    Bias,
    Y,
    M,
    N,
    K,
    stride_ym,
    tiles,
    per_program,
    early,  # ring slots filled before the wait (the rest after it)
    peers,  # PUSH: device address of the ranks' symmetric buffer addresses (uint64)
    push_offset,  # PUSH: bytes from a buffer's start to one_shot_norm's region
    HAS_BIAS: gl.constexpr,
    RELU: gl.constexpr,
    PDL: gl.constexpr,
    STAGES: gl.constexpr,
    PUSH: gl.constexpr,  # also push each tile into every rank's slot (`_push_tile`)
    RANK: gl.constexpr,
    WORLD: gl.constexpr,
    HALF: gl.constexpr,  # one_shot_norm's region: bytes of a half, of a slot, slots a rank
    ROW: gl.constexpr,
    ROWS: gl.constexpr,
):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = w_desc.block_type.shape[1]
    WARPS: gl.constexpr = gl.num_warps()
    # [rows of x, features, K]: a warp reads one 512-byte row of a weight tile at a time
    product: gl.constexpr = gl.BlockedLayout([BLOCK_M, 1, 8], [1, 1, 32], [1, WARPS, 1], [2, 1, 0])
    w_layout: gl.constexpr = gl.SliceLayout(0, product)
    x_layout: gl.constexpr = gl.SliceLayout(1, product)
    out_layout: gl.constexpr = gl.SliceLayout(2, product)

    pid = gl.program_id(0)
    first = pid * per_program
    count = gl.minimum(per_program, tiles - first)
    steps_k = gl.cdiv(K, BLOCK_K)
    steps = count * steps_k

    w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    x_ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    fence_async_shared()
    for s in gl.static_range(STAGES):  # no kernel writes the weights: streamed before the wait
        live = (s < steps) & (s < early)
        _load_weights(w_desc, x_desc, ready, w_ring, s, s, first, steps_k, live)
    wait_then_release(PDL)  # the kernel before has finished: x is ready, y is free
    for s in gl.static_range(STAGES):
        late = (s < steps) & (s >= early)
        _load_weights(w_desc, x_desc, ready, w_ring, s, s, first, steps_k, late)
        _load_x(x_desc, ready, x_ring, s, s, steps_k, s < steps)

    m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    step = 0
    for t in range(count):
        n = (first + t) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
        if HAS_BIAS:  # in flight through the tile's K steps
            bias = gl.load(Bias + n, mask=n < N, other=0.0).to(gl.float32)
        partial = gl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], gl.float32, product)  # summed at the end
        for _ in range(steps_k):
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            w = w_ring.index(slot).load(w_layout).to(gl.float32)
            x = x_ring.index(slot).load(x_layout).to(gl.float32)
            partial += gl.expand_dims(w, 0) * gl.expand_dims(x, 1)
            _cta_barrier()  # every warp has read the slot: refill it
            refill = step + STAGES
            live = refill < steps
            _load_weights(w_desc, x_desc, ready, w_ring, slot, refill, first, steps_k, live)
            _load_x(x_desc, ready, x_ring, slot, refill, steps_k, live)
            step += 1
        acc = gl.sum(partial, axis=2)
        if HAS_BIAS:
            acc += gl.expand_dims(bias, 0)
        if RELU:
            acc = gl.maximum(acc, 0.0)
        y_ptrs = Y + gl.expand_dims(m, 1) * stride_ym + gl.expand_dims(n, 0)
        mask = gl.expand_dims(m < M, 1) & gl.expand_dims(n < N, 0)
        gl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)
        if PUSH:
            y = acc.to(Y.dtype.element_ty)
            _push_tile(y, m, n, mask, peers, push_offset, RANK, WORLD, HALF, ROW, ROWS)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))


@gluon.jit
def _push_tile(
    y,
    m,
    n,
    mask,
    peers,
    offset,
    RANK: gl.constexpr,
    WORLD: gl.constexpr,
    HALF: gl.constexpr,
    ROW: gl.constexpr,
    ROWS: gl.constexpr,
):
    """Stores the tile `y` (rows m, features n) into this rank's slot of each row in every rank's
    region of one_shot_norm, the half of the row's next call, -0.0 as +0.0: what that kernel's
    first step would push, pushed as each tile ends instead of after the whole GEMV (its
    `pushed` calls then only wait for the rows). After the wait: the row counts were written by
    an earlier call of that kernel, which has ended."""
    table = peers.to(gl.pointer_type(gl.uint64))
    mine = gl.load(table + RANK)
    counters = (mine + offset + 2 * HALF).to(gl.pointer_type(gl.uint32))
    call = gl.load(counters + m, mask=m < ROWS, other=0) + 1
    at = offset + (call % 2).to(gl.uint64) * HALF + (RANK * ROWS + m).to(gl.uint64) * ROW
    bits = y.to(gl.int16, bitcast=True)
    bits = gl.where(bits == SENTINEL, 0, bits)
    for peer in gl.static_range(WORLD):
        row = (gl.load(table + peer) + at).to(gl.pointer_type(gl.int16))
        gl.store(gl.expand_dims(row, 1) + gl.expand_dims(n, 0), bits, mask=mask)


def takes(x, weight) -> bool:
    """Whether this kernel can run x [M, K] @ weight [N, K].T: at most MAX_ROWS rows, dense
    rows whose starts TMA can address (16-byte aligned)."""
    return (
        x.dim() == 2
        and x.shape[0] <= MAX_ROWS
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and all(
            t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in (x, weight)
        )
    )


@functools.cache
def _layout(bits: int):
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=2)


@functools.cache
def plan(tiles: int, sms: int) -> tuple[int, int]:
    """(tiles a program, programs): the fewest programs, at most `sms`, that give every program
    the same number of tiles but the last."""
    per = triton.cdiv(tiles, sms)
    return per, triton.cdiv(tiles, per)


def gemv(x, weight, bias=None, relu=False, pdl=False, early=None, push=None):
    """x [M, K] (M <= MAX_ROWS) @ weight [N, K].T (+ bias [N]) (ReLU) -> [M, N] in x's dtype,
    a program's first RING_BYTES of weight tiles copied before the wait (`pdl`: a programmatic
    dependent launch; module docstring). `early`: how many of the ring's slots to fill before
    the wait (default all; ENERGON_GEMV_TMA_EARLY). `push` (a one_shot_norm.Push, float16):
    also push the result into every rank's slots for `one_shot_add_norm(..., pushed=True)`,
    which must follow (a collective: every rank pushes)."""
    import torch

    M, K = x.shape
    N = weight.shape[0]
    if not takes(x, weight) or weight.shape[1] != K:
        raise ValueError(
            f"gemv_tma takes x [<= {MAX_ROWS}, K] and weight [N, K], 16-byte aligned rows"
        )
    if push is not None and not one_shot_norm.fits(x.dtype, M, N):
        raise ValueError(f"gemv_tma cannot push {x.dtype} [{M}, {N}] into one_shot_norm's slots")
    if early is None:
        early = int(os.environ.get("ENERGON_GEMV_TMA_EARLY", STAGES))
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    layout = _layout(x.element_size() * 8)
    x_desc = TensorDescriptor.from_tensor(x, [1 if M == 1 else MAX_ROWS, BLOCK_K], layout)
    w_desc = TensorDescriptor.from_tensor(weight, [BLOCK_N, BLOCK_K], layout)
    tiles = triton.cdiv(N, BLOCK_N)
    per, programs = plan(tiles, sm_count(x.device))
    _gemv_tma_kernel[(programs,)](
        x_desc,
        w_desc,
        bias if bias is not None else weight,
        y,
        M,
        N,
        K,
        y.stride(0),
        tiles,
        per,
        early,
        push.table if push else 0,
        push.offset if push else 0,
        HAS_BIAS=bias is not None,
        RELU=relu,
        STAGES=STAGES,
        PUSH=push is not None,
        RANK=push.rank if push else 0,
        WORLD=push.world if push else 1,
        HALF=one_shot_norm.half_bytes(push.world) if push else 0,
        ROW=one_shot_norm.ROW_BYTES,
        ROWS=one_shot_norm.MAX_ROWS,
        num_warps=NUM_WARPS,
        **launch_options(pdl),
    )
    return y
