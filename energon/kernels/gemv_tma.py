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
from energon.kernels.chain import launch_options, release, wait, wait_then_release
from energon.kernels.gemv import TMA_ROWS
from energon.kernels.one_shot_norm import SENTINEL, Rows

# triton 3.6 (the GPU image) names the TMA load async_copy_global_to_shared; 3.9 async_load
# and its CTA barrier thread_barrier; 3.9 barrier
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier

MAX_ROWS = TMA_ROWS  # rows of x this kernel takes; more go to gemv_kernels
MAX_NORM_WIDTH = 8192  # K of an x made from pushed rows, kept whole in shared memory
LATE_ENV = "ENERGON_PUSH_LATE_RELEASE"  # "1": a pushing GEMV releases the next after its tiles
BLOCK_N = 32  # output features a tile (16 and 8 lost 3-40 us a call on an H200; again where
# they spread a K-heavy shape over more SMs: docs/benchmarks.md, "row-parallel GEMVs push")
BLOCK_K = 256  # input features a step: one 512-byte row of a tile per warp load
RING_BYTES = 160 << 10  # weights a program keeps in flight (its ring's slots)
STAGES = RING_BYTES // (BLOCK_N * BLOCK_K * 2)  # ring slots (fp16 / bf16 tiles)
NUM_WARPS = 4  # (8 were 0.4-6 us slower a call, but on the K-heavy shapes at tp=2)


@gluon.jit
def _load_weights(
    w_desc, x_desc, ready, w_ring, slot, step, first, steps_k, live, NORM: gl.constexpr
):
    """Ring step `step` (tile first + step // steps_k, K step step % steps_k): its weight tile
    into `slot`, the slot's mbarrier told to expect it and the x tile (none with NORM: x is
    in shared memory whole)."""
    rows: gl.constexpr = w_desc.block_type.shape[0]
    x_bytes: gl.constexpr = 0 if NORM else x_desc.block_type.nbytes
    bytes_: gl.constexpr = w_desc.block_type.nbytes + x_bytes
    mbarrier.expect(ready.index(slot), bytes_, pred=live)
    tile = first + step // steps_k
    k = (step % steps_k) * w_desc.block_type.shape[1]
    _tma_load(w_desc, [tile * rows, k], ready.index(slot), w_ring.index(slot), pred=live)


# x kept whole, seen as one [rows, BLOCK_K] buffer a K step (triton 3.6 names the view
# _reinterpret, 3.9 reinterpret)
if hasattr(gl.shared_memory_descriptor, "reinterpret"):

    @gluon.jit
    def _by_step(whole, dtype: gl.constexpr, STEPS: gl.constexpr, M: gl.constexpr, K: gl.constexpr):
        return whole.reinterpret(dtype, [STEPS, M, K], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))

else:

    @gluon.jit
    def _by_step(whole, dtype: gl.constexpr, STEPS: gl.constexpr, M: gl.constexpr, K: gl.constexpr):
        return whole._reinterpret(dtype, [STEPS, M, K], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))


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
    peers,  # PUSH / NORM: device address of the ranks' symmetric buffer addresses (uint64)
    region,  # PUSH / NORM: bytes from a buffer's start to one_shot_norm's region
    lag,  # PUSH / NORM: rows' calls read in GEMVs since the counts were last written
    Residual,  # NORM: what one_shot_norm's `_one_shot_norm_kernel` takes, its norm's
    RowBias,  # input being this GEMV's x
    NormWeight,
    NormBias,
    Summed,
    Normed,
    eps,
    HAS_BIAS: gl.constexpr,
    RELU: gl.constexpr,
    PDL: gl.constexpr,
    STAGES: gl.constexpr,
    PUSH: gl.constexpr,  # also push each tile into every rank's slot (`_push_tile`)
    RESET: gl.constexpr,  # PUSH: put SENTINEL back into the slots a NORM GEMV read last
    LATE: gl.constexpr,  # PUSH: release the next kernel after the last tile, not after the wait
    FENCE: gl.constexpr,  # RESET: fence the reset before the pushes (experiment switch)
    NORM: gl.constexpr,  # x is one_shot_norm's sum + norm of the pushed rows (`_normed_rows`)
    ADD: gl.constexpr,  # NORM: as one_shot_norm's kernel
    HAS_ROW_BIAS: gl.constexpr,
    HAS_WEIGHT: gl.constexpr,
    HAS_NORM_BIAS: gl.constexpr,
    RMS: gl.constexpr,
    X_STEPS: gl.constexpr,  # NORM: K steps of x kept in shared memory (a power of two)
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
    # NORM: x as [K steps, rows, BLOCK_K], a warp's threads along K
    whole: gl.constexpr = gl.BlockedLayout([1, BLOCK_M, 8], [1, 1, 32], [WARPS, 1, 1], [2, 1, 0])

    pid = gl.program_id(0)
    first = pid * per_program
    count = gl.minimum(per_program, tiles - first)
    steps_k = gl.cdiv(K, BLOCK_K)
    steps = count * steps_k

    w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    if NORM:  # stored whole as [K steps, rows, BLOCK_K], read a K step at a time (plain rows)
        x_whole = gl.allocate_shared_memory(
            x_desc.dtype, [X_STEPS, BLOCK_M, BLOCK_K], gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
        )
        x_ring = _by_step(x_whole, x_desc.dtype, X_STEPS, BLOCK_M, BLOCK_K)
    else:
        x_ring = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    fence_async_shared()
    for s in gl.static_range(STAGES):  # no kernel writes the weights: streamed before the wait
        live = (s < steps) & (s < early)
        _load_weights(w_desc, x_desc, ready, w_ring, s, s, first, steps_k, live, NORM)
    if NORM:  # the rows' calls and residual: older than the kernel before (one_shot_norm.py)
        call, residual = _before_rows(peers, region, lag, Residual, M, K, whole,
                                      BLOCK_M, BLOCK_K, X_STEPS, ADD, RANK, HALF)  # fmt: skip
    if LATE:
        wait(PDL)
    else:
        wait_then_release(PDL)  # the kernel before has finished: x is ready, y is free
    if NORM:
        normed = _normed_rows(call, residual, peers, region, RowBias, NormWeight, NormBias,
                              Summed, Normed, M, K, eps, pid, whole, ADD, HAS_ROW_BIAS,
                              HAS_WEIGHT, HAS_NORM_BIAS, RMS, RANK, WORLD, HALF, ROW, ROWS,
                              BLOCK_M, BLOCK_K, X_STEPS)  # fmt: skip
        x_whole.store(normed)
        _cta_barrier()
    for s in gl.static_range(STAGES):
        late = (s < steps) & (s >= early)
        _load_weights(w_desc, x_desc, ready, w_ring, s, s, first, steps_k, late, NORM)
        if not NORM:
            _load_x(x_desc, ready, x_ring, s, s, steps_k, s < steps)
    if RESET:
        if pid == 0:
            _reset_read_half(peers, region, lag, M, N, RANK, WORLD, HALF, ROW, ROWS, FENCE)

    m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
    step = 0
    for t in range(count):
        n = (first + t) * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
        if HAS_BIAS:  # in flight through the tile's K steps
            bias = gl.load(Bias + n, mask=n < N, other=0.0).to(gl.float32)
        partial = gl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], gl.float32, product)  # summed at the end
        for kk in range(steps_k):
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            w = w_ring.index(slot).load(w_layout).to(gl.float32)
            if NORM:
                x = x_ring.index(kk).load(x_layout).to(gl.float32)
            else:
                x = x_ring.index(slot).load(x_layout).to(gl.float32)
            partial += gl.expand_dims(w, 0) * gl.expand_dims(x, 1)
            _cta_barrier()  # every warp has read the slot: refill it
            refill = step + STAGES
            live = refill < steps
            _load_weights(w_desc, x_desc, ready, w_ring, slot, refill, first, steps_k, live, NORM)
            if not NORM:
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
            _push_tile(y, m, n, mask, peers, region, lag, RANK, WORLD, HALF, ROW, ROWS)
    if LATE:
        release(PDL)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))


@gluon.jit
def _steps_k(
    BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, X_STEPS: gl.constexpr, whole: gl.constexpr
):
    """Index tensors of x kept whole ([K steps, rows, BLOCK_K] in `whole`): (k [steps, 1, BLOCK_K],
    m [1, rows, 1])."""
    s = gl.arange(0, X_STEPS, layout=gl.SliceLayout(1, gl.SliceLayout(2, whole)))
    m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, gl.SliceLayout(2, whole)))
    j = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, gl.SliceLayout(1, whole)))
    k = gl.expand_dims(gl.expand_dims(s, 1), 2) * BLOCK_K + gl.expand_dims(gl.expand_dims(j, 0), 1)
    return k, gl.expand_dims(gl.expand_dims(m, 0), 2)


@gluon.jit
def _before_rows(peers, region, lag, Residual, M, K, whole: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_K: gl.constexpr, X_STEPS: gl.constexpr, ADD: gl.constexpr,
                 RANK: gl.constexpr, HALF: gl.constexpr):  # fmt: skip
    """NORM, before the wait: (each row's call [1, rows, 1], its residual as float32 or 0). The
    counts were written by one_shot_norm's kernel, the residual by a kernel two or more back."""
    k, m = _steps_k(BLOCK_M, BLOCK_K, X_STEPS, whole)
    mask = (k < K) & (m < M)
    mine = gl.load(peers.to(gl.pointer_type(gl.uint64)) + RANK)
    counters = (mine + region + 2 * HALF).to(gl.pointer_type(gl.uint32))
    call = gl.load(counters + m, mask=m < M, other=0) + 1 + lag
    residual = gl.zeros([X_STEPS, BLOCK_M, BLOCK_K], gl.float32, whole)
    if ADD:
        residual = gl.load(Residual + m * K + k, mask=mask, other=0.0).to(gl.float32)
    return call, residual


@gluon.jit
def _normed_rows(call, residual, peers, region, RowBias, NormWeight, NormBias, Summed, Normed,
                 M, K, eps, pid, whole: gl.constexpr, ADD: gl.constexpr,
                 HAS_ROW_BIAS: gl.constexpr, HAS_WEIGHT: gl.constexpr,
                 HAS_NORM_BIAS: gl.constexpr, RMS: gl.constexpr, RANK: gl.constexpr,
                 WORLD: gl.constexpr, HALF: gl.constexpr, ROW: gl.constexpr, ROWS: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, X_STEPS: gl.constexpr):  # fmt: skip
    """NORM, after the wait: one_shot_norm's steps 2-4 in every program, its sum and norm of
    the rows the GEMV before pushed, as float16 [K steps, rows, BLOCK_K] (0 past K and M).
    Program 0 stores the sum and the normed rows (`Summed`, `Normed`); the slots are left as
    they are (the next pushing GEMV puts SENTINEL back: `_reset_read_half`) and the counts
    too (the host counts this call in `lag` until one_shot_norm's kernel writes them)."""
    k, m = _steps_k(BLOCK_M, BLOCK_K, X_STEPS, whole)
    mask = (k < K) & (m < M)
    table = peers.to(gl.pointer_type(gl.uint64))
    mine = gl.load(table + RANK)
    half = mine + region + (call % 2).to(gl.uint64) * HALF + (m * ROW).to(gl.uint64)
    rows = gl.multiple_of(half.to(gl.pointer_type(gl.int16)), [1, 1, 16])  # [1, rows, 1]
    weight = gl.zeros([X_STEPS, BLOCK_M, BLOCK_K], gl.float32, whole)
    norm_bias = gl.zeros([X_STEPS, BLOCK_M, BLOCK_K], gl.float32, whole)
    row_bias = gl.zeros([X_STEPS, BLOCK_M, BLOCK_K], gl.float32, whole)
    on_k = (k < K) & (m >= 0)
    if HAS_WEIGHT:  # in flight while the rows are waited for
        weight = gl.load(NormWeight + k + m * 0, mask=on_k, other=0.0).to(gl.float32)
    if HAS_NORM_BIAS:
        norm_bias = gl.load(NormBias + k + m * 0, mask=on_k, other=0.0).to(gl.float32)
    if HAS_ROW_BIAS:
        row_bias = gl.load(RowBias + k + m * 0, mask=on_k, other=0.0).to(gl.float32)
    total = gl.zeros([X_STEPS, BLOCK_M, BLOCK_K], gl.float32, whole)
    for rank in gl.static_range(WORLD):  # each rank's rows, every element come, in rank order
        slot = rows + rank * ROWS * ROW // 2 + k
        got = gl.load(slot, mask=mask, other=0, volatile=True)
        while _any(((got == SENTINEL) & mask).to(gl.int32)) > 0:
            got = gl.load(slot, mask=mask, other=0, volatile=True)
        total += got.to(gl.float16, bitcast=True).to(gl.float32)
    if HAS_ROW_BIAS:
        total += row_bias
    summed = total.to(gl.float16)  # the all-reduce's result, rounded once
    if ADD:
        summed = (summed.to(gl.float32) + residual).to(gl.float16)
    x = summed.to(gl.float32)
    if RMS:
        rstd = gl.rsqrt(_rows_sum(x * x) / K + eps)
        y = (x * rstd).to(gl.float16).to(gl.float32)
    else:
        mean = _rows_sum(x) / K
        centred = gl.where(mask, x - mean, 0.0)
        rstd = gl.rsqrt(_rows_sum(centred * centred) / K + eps)
        y = centred * rstd
    if HAS_WEIGHT:
        y = y * weight
    if HAS_NORM_BIAS:
        y = y + norm_bias
    normed = gl.where(mask, y, 0.0).to(gl.float16)
    if pid == 0:
        gl.store(Summed + m * K + k, summed, mask=mask)
        gl.store(Normed + m * K + k, normed, mask=mask)
    return normed


@gluon.jit
def _rows_sum(v):
    """Each row's sum of v [K steps, rows, BLOCK_K], broadcast back to [1, rows, 1]."""
    return gl.expand_dims(gl.expand_dims(gl.sum(gl.sum(v, axis=2), axis=0), 0), 2)


@gluon.jit
def _any(flags):
    """The largest of [K steps, rows, BLOCK_K] int32 flags."""
    return gl.max(gl.max(gl.max(flags, axis=2), axis=1), axis=0)


@gluon.jit
def _reset_read_half(peers, region, lag, M, N, RANK: gl.constexpr, WORLD: gl.constexpr,
                     HALF: gl.constexpr, ROW: gl.constexpr, ROWS: gl.constexpr,
                     FENCE: gl.constexpr):  # fmt: skip
    """RESET (program 0 of a pushing GEMV, after its wait): SENTINEL back into every rank's
    slot of this rank's rows in the half of the call before this one, which a NORM GEMV read
    (its kernel has ended: it was before this one's wait) and which the peers push into
    again at the call after this one, once they have this call's rows: so the stores are
    fenced (system scope) before any of this GEMV's pushes."""
    WARPS: gl.constexpr = gl.num_warps()
    BLOCK: gl.constexpr = 8 * 32 * WARPS
    flat: gl.constexpr = gl.BlockedLayout([1, 8], [1, 32], [1, WARPS], [1, 0])
    m = gl.arange(0, 2, layout=gl.SliceLayout(1, flat))
    cols = gl.arange(0, BLOCK, layout=gl.SliceLayout(0, flat))
    mine = gl.load(peers.to(gl.pointer_type(gl.uint64)) + RANK)
    counters = (mine + region + 2 * HALF).to(gl.pointer_type(gl.uint32))
    call = gl.load(counters + m, mask=m < M, other=0) + lag  # the call before this one's
    base = gl.expand_dims(
        mine + region + (call % 2).to(gl.uint64) * HALF + (m * ROW).to(gl.uint64), 1
    )
    sentinel = gl.full([2, BLOCK], SENTINEL, gl.int16, flat)
    for rank in gl.static_range(WORLD):
        for c0 in range(0, N, BLOCK):
            c = c0 + cols
            at = base + (rank * ROWS * ROW) + gl.expand_dims(c * 2, 0).to(gl.uint64)
            keep = gl.expand_dims(m < M, 1) & gl.expand_dims(c < N, 0)
            gl.store(at.to(gl.pointer_type(gl.int16)), sentinel, mask=keep)
    if FENCE:
        _fence_system(call)


@gluon.jit
def _fence_system(anything):
    """fence.acq_rel.sys: this thread's earlier stores are seen before its later ones by every
    observer, the peers included."""
    gl.inline_asm_elementwise(
        "fence.acq_rel.sys; mov.u32 $0, 0;", "=r,r", [anything], dtype=gl.int32, is_pure=False,
        pack=1,
    )  # fmt: skip


@gluon.jit
def _push_tile(
    y,
    m,
    n,
    mask,
    peers,
    offset,
    lag,
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
    call = gl.load(counters + m, mask=m < ROWS, other=0) + 1 + lag
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


def gemv(x, weight, bias=None, relu=False, pdl=False, early=None, push=None, rows=None):
    """x [M, K] (M <= MAX_ROWS) @ weight [N, K].T (+ bias [N]) (ReLU) -> [M, N] in x's dtype,
    a program's first RING_BYTES of weight tiles copied before the wait (`pdl`: a programmatic
    dependent launch; module docstring). `early`: how many of the ring's slots to fill before
    the wait (default all; ENERGON_GEMV_TMA_EARLY). `push` (a one_shot_norm.Push, float16):
    also push the result into every rank's slots for `one_shot_add_norm(..., pushed=True)`,
    which must follow (a collective: every rank pushes). `rows` (a one_shot_norm.Rows): x is
    not read but made, the sum and norm of the rows the GEMV before pushed (`x` only gives its
    shape and dtype; rows.summed and rows.normed receive them)."""
    import torch

    M, K = x.shape
    N = weight.shape[0]
    if not takes(x, weight) or weight.shape[1] != K:
        raise ValueError(
            f"gemv_tma takes x [<= {MAX_ROWS}, K] and weight [N, K], 16-byte aligned rows"
        )
    if push is not None and not one_shot_norm.fits(x.dtype, M, N):
        raise ValueError(f"gemv_tma cannot push {x.dtype} [{M}, {N}] into one_shot_norm's slots")
    if rows is not None and not norms_rows(x.dtype, M, K):
        raise ValueError(f"gemv_tma cannot make x {x.dtype} [{M}, {K}] from pushed rows")
    if early is None:
        early = int(os.environ.get("ENERGON_GEMV_TMA_EARLY", STAGES))
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    layout = _layout(x.element_size() * 8)
    x_desc = TensorDescriptor.from_tensor(x, [1 if M == 1 else MAX_ROWS, BLOCK_K], layout)
    w_desc = TensorDescriptor.from_tensor(weight, [BLOCK_N, BLOCK_K], layout)
    tiles = triton.cdiv(N, BLOCK_N)
    per, programs = plan(tiles, sm_count(x.device))
    group = push or (rows.push if rows is not None else None)
    stand_in = weight  # pointers a call does not read
    _gemv_tma_kernel[(programs,)](
        x_desc,
        w_desc,
        bias if bias is not None else stand_in,
        y,
        M,
        N,
        K,
        y.stride(0),
        tiles,
        per,
        early,
        group.table if group else 0,
        group.offset if group else 0,
        group.lag if group else 0,
        *(_or(t, stand_in) for t in (rows or Rows.absent()).tensors()),
        rows.eps if rows is not None else 0.0,
        HAS_BIAS=bias is not None,
        RELU=relu,
        STAGES=STAGES,
        PUSH=push is not None,
        RESET=push is not None and push.reset,
        LATE=push is not None and os.environ.get(LATE_ENV) == "1",
        FENCE=os.environ.get("ENERGON_RESET_FENCE", "1") != "0",
        NORM=rows is not None,
        ADD=rows is not None and rows.residual is not None,
        HAS_ROW_BIAS=rows is not None and rows.row_bias is not None,
        HAS_WEIGHT=rows is not None and rows.weight is not None,
        HAS_NORM_BIAS=rows is not None and rows.norm_bias is not None,
        RMS=rows is not None and rows.rms,
        X_STEPS=triton.next_power_of_2(triton.cdiv(K, BLOCK_K)),
        RANK=group.rank if group else 0,
        WORLD=group.world if group else 1,
        HALF=one_shot_norm.half_bytes(group.world) if group else 0,
        ROW=one_shot_norm.ROW_BYTES,
        ROWS=one_shot_norm.MAX_ROWS,
        num_warps=NUM_WARPS,
        **launch_options(pdl),
    )
    return y


def _or(t, stand_in):
    return t if t is not None else stand_in


def norms_rows(dtype, rows: int, width: int) -> bool:
    """Whether this kernel makes x [rows, width] from pushed rows (`gemv`'s `rows`): float16,
    at most MAX_ROWS rows of at most MAX_NORM_WIDTH."""
    return one_shot_norm.fits(dtype, rows, width) and rows <= MAX_ROWS and width <= MAX_NORM_WIDTH
