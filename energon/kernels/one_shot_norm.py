"""A row-parallel layer's all-reduce, bias, residual add and the norm after them, as one kernel.

At tp > 1 a decoder layer all-reduces twice (after attention's output projection and after the
MLP's down projection), and each sum goes straight into a residual add and a norm. As two
kernels (the one-shot all-reduce of energon/kernels/one_shot.py, then the add+norm of
norm_kernels.py) that is two launches and two round trips through memory per sum, 80 of each in a
40-layer decode step. Here one program per row does it all, and meets the peers without flags:

1. pushes its row of `x` (this rank's partial product) into this rank's slot for the row in every
   rank's symmetric buffer, its own included (plain stores over NVLink: nothing waits for them);
2. waits until each rank's slot in its own buffer holds a row: a slot no rank has written holds
   -0.0 in every element (`SENTINEL`), and a pushed row never does (x's -0.0 is pushed as +0.0,
   which sums alike). Each element proves itself, so no flag, fence or acknowledgement is needed,
   and what the wait costs is the one-way latency of the slowest peer's stores;
3. sums the row over the ranks in float32 in rank order, adds the bias and rounds once: the
   one-shot kernel's sum, bit for bit (but for the sign of an exact zero), and puts SENTINEL back
   into the slots it read;
4. adds the residual (float32, rounded once: `x + residual`) and stores that sum, then normalises
   it with the norm kernel's own code (`norm_kernels.normalise`): the add+norm kernel's result,
   bit for bit.

The one-shot kernel pulls instead: it copies its piece into its own buffer, posts a flag to every
peer (a system-scope release, which waits for the copy to land), waits for theirs and then reads
their buffers over NVLink, a round trip more. Pushing takes a slot per rank: each rank's region
holds, per half, WORLD x MAX_ROWS rows, `ROW_BYTES` apart whatever the width.

Call c of row r uses half c % 2 (program r counts row r's calls), so calls of any row count may
follow each other. A slot of half c % 2 is written again at call c + 2 of its row; a peer gets
there only after its call c + 1, which waited for this rank's push of call c + 1, which this rank
makes after call c (and its putting back of SENTINEL) has ended: kernels on one stream end in
order. The region, from `offset` in the symmetric buffer: two halves, then the counts (MAX_ROWS
uint32); the halves hold SENTINEL and the counts zero at first (`prepare_region`). float16 only,
like the one-shot kernel's use in energon/parallel/allreduce.py, which decides when this runs.

`pushed`: step 1 was done by the GEMV that computed x (energon/kernels/gemv_tma.py, `push`), tile
by tile as its tiles ended, into the same slots and halves (it reads the row counts after its
wait). This kernel then never reads x; it reads the row's count and its residual before its wait
(both older than the GEMV: an earlier call of this kernel, at least two kernels back, wrote them)
and after it only waits for the rows, sums and normalises. On 2 H200s at tp=2 (opt-13b, batch 1)
that took the two all-reduce + norms of a layer from 7.1-8.1 to 5.9-7.0 us each, the output
projection's GEMV from 7.0 to 7.8: 4.21 against 4.32 ms a token (docs/benchmarks.md, "row-parallel
GEMVs push"). Waiting for the rows before the wait, or letting the next kernel go first, lost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from energon.kernels.chain import chained, wait_then_release
from energon.kernels.norm_kernels import MAX_WIDTH, affine, normalise, num_warps_for, vector

MAX_ROWS = 64  # rows of one call: a decode step's batch up to 64 sequences
ROW_BYTES = MAX_WIDTH * 2  # float16 rows of up to MAX_WIDTH
ALIGN = 16
SENTINEL = tl.constexpr(-32768)  # the int16 bits of float16 -0.0: an element not pushed yet


class Push(NamedTuple):
    """Where a GEMV pushes its rows for this kernel (energon/kernels/gemv_tma.py, `push`)."""

    table: int  # device address of the ranks' symmetric buffer addresses (uint64)
    rank: int
    world: int
    offset: int  # bytes from a buffer's start to this kernel's region


def fits(dtype: torch.dtype, rows: int, width: int) -> bool:
    """Whether rows of this shape and dtype fit the region's slots (`takes` asks, and a GEMV
    that would push them: shapes and dtypes only, alike on every rank)."""
    return dtype == torch.float16 and 0 < rows <= MAX_ROWS and 0 < width <= MAX_WIDTH


def half_bytes(world: int) -> int:
    """Bytes of one half of the region: a slot per rank and row."""
    return world * MAX_ROWS * ROW_BYTES


def region_bytes(world: int) -> int:
    """Bytes of the symmetric buffer this kernel uses, from its offset."""
    return 2 * half_bytes(world) + 4 * MAX_ROWS


def prepare_region(buffer: torch.Tensor, offset: int, world: int) -> None:
    """Puts SENTINEL into every slot and zero into the counts of the region at `offset` of this
    rank's symmetric `buffer` (uint8): before any peer may push (the set-up does it before the
    rendezvous, and waits for it)."""
    halves = buffer[offset : offset + 2 * half_bytes(world)]
    halves.view(torch.int16).fill_(SENTINEL.value)
    buffer[offset + 2 * half_bytes(world) : offset + region_bytes(world)].zero_()


def takes(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> bool:
    """Whether `one_shot_add_norm` takes these: x a dense float16 [rows <= MAX_ROWS, width <=
    MAX_WIDTH], residual shaped like it, weight / biases [width], all float16 on x's device.
    Shapes and dtypes only, so every rank of a group answers alike."""
    if x.dim() != 2 or not x.is_contiguous() or not fits(x.dtype, *x.shape):
        return False
    width = x.shape[1]
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        return False
    vectors = [t for t in (weight, norm_bias, bias) if t is not None]
    if any(t.shape != (width,) or not t.is_contiguous() for t in vectors):
        return False
    return all(
        t.dtype == x.dtype and t.device == x.device for t in (residual, *vectors) if t is not None
    )


@triton.jit
def _one_shot_norm_kernel(
    X,
    Residual,
    Summed,
    Out,
    Weight,
    NormBias,
    Bias,
    buffers,  # device address of WORLD buffer addresses (uint64)
    stride_r,
    width,
    eps,
    offset,  # bytes from a buffer's start to this kernel's region
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    RMS: tl.constexpr,
    ADD: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HALF: tl.constexpr,
    ROW: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # a programmatic dependent launch (chain.py)
    PUSHED: tl.constexpr,  # the GEMV before pushed every rank's row (gemv_tma.py): no step 1
    NORM: tl.constexpr,  # normalise the sum into Out (else the sum alone: `pushed_sum`)
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    # What no kernel writes, before the wait: the buffer addresses, the weights and biases. The
    # residual is loaded right after it, beside x, so that its latency hides behind the push and
    # the wait for the peers' rows instead of following them; PUSHED, before it with the row's
    # count (both older than the kernel before), so that the rows' loads come first after it.
    table = buffers.to(tl.pointer_type(tl.uint64))
    mine = tl.load(table + RANK)
    weight, norm_bias = affine(Weight, NormBias, cols, mask, HAS_WEIGHT, HAS_NORM_BIAS)
    bias = vector(Bias, cols, mask, HAS_BIAS)
    counters = (mine + offset + 2 * HALF).to(tl.pointer_type(tl.uint32))
    if not PUSHED:
        wait_then_release(PDL)
    call = tl.load(counters + row) + 1  # uint32: wraps, keeping its parity
    r = _residual(Residual, row, stride_r, cols, mask, ADD)
    if PUSHED:
        wait_then_release(PDL)
    summed = _sum_rows(X, r, bias, mine, table, width, offset, call, row, cols, mask,
                       RANK, WORLD, ADD, HAS_BIAS, HALF, ROW, ROWS, PUSHED)  # fmt: skip
    tl.store(Summed + row * width + cols, summed, mask=mask)
    if NORM:
        y = normalise(summed, mask, width, eps, weight, norm_bias, RMS, HAS_WEIGHT, HAS_NORM_BIAS)
        tl.store(Out + row * width + cols, y.to(Out.dtype.element_ty), mask=mask)
    # after the reductions of the wait for the rows: every thread has read `call`
    tl.store(counters + row, call)


@triton.jit
def _residual(Residual, row, stride_r, cols, mask, ADD: tl.constexpr):
    """The row's residual (in flight while the rows are pushed and waited for), or 0."""
    r = tl.zeros(cols.shape, Residual.dtype.element_ty)
    if ADD:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0)
    return r


@triton.jit
def _sum_rows(
    X,
    r,
    bias,
    mine,
    table,
    width,
    offset,
    call,
    row,
    cols,
    mask,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    ADD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HALF: tl.constexpr,
    ROW: tl.constexpr,
    ROWS: tl.constexpr,
    PUSHED: tl.constexpr,
):
    """Steps 1-3 and the residual add of the module's docstring: the row summed over the ranks
    (+ bias) (+ residual), in X's dtype; the slots read are put back to SENTINEL."""
    dtype = X.dtype.element_ty
    half = offset + (call % 2).to(tl.uint64) * HALF

    # 1. this rank's row into its slot on every rank, -0.0 as +0.0 (its bits as int16)
    if not PUSHED:
        bits = tl.load(X + row * width + cols, mask=mask, other=0.0).to(tl.int16, bitcast=True)
        bits = tl.where(bits == SENTINEL, 0, bits)
        slot_of_mine = half + (RANK * ROWS + row).to(tl.uint64) * ROW
        for peer in tl.static_range(WORLD):
            theirs = tl.load(table + peer)
            slot = tl.multiple_of((theirs + slot_of_mine).to(tl.pointer_type(tl.int16)), 16)
            tl.store(slot + cols, bits, mask=mask)

    # 2, 3. each rank's row, once every element has come, summed in rank order; the slots
    # are put back to SENTINEL for the call two later
    total = tl.zeros(cols.shape, dtype=tl.float32)
    for rank in tl.static_range(WORLD):
        at = (mine + half + (rank * ROWS + row).to(tl.uint64) * ROW).to(tl.pointer_type(tl.int16))
        slot = tl.multiple_of(at, 16) + cols
        got = tl.load(slot, mask=mask, other=0, volatile=True)
        while tl.max(((got == SENTINEL) & mask).to(tl.int32), 0) > 0:
            got = tl.load(slot, mask=mask, other=0, volatile=True)
        total += got.to(dtype, bitcast=True).to(tl.float32)
        tl.store(slot, tl.full(cols.shape, SENTINEL, tl.int16), mask=mask)
    if HAS_BIAS:
        total += bias
    summed = total.to(dtype)  # the all-reduce's result, rounded once

    # 4. the residual add (the norm is the caller's)
    if ADD:
        summed = (summed.to(tl.float32) + r.to(tl.float32)).to(dtype)
    return summed


def one_shot_add_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    norm_bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    bias: torch.Tensor | None,
    buffer_ptrs: int,
    rank: int,
    world: int,
    offset: int,
    pushed: bool = False,
    normalised: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(normed, summed): summed = the sum over ranks of x (+ bias) (+ residual), normed = its
    LayerNorm (RMSNorm when `rms`; norm_bias ignored then) by weight and norm_bias, None unless
    `normalised` (the sum alone: no norm computed). Arguments
    as `takes` accepts them (its caller, OneShotAllReduce.fused_add_norm, has asked);
    `buffer_ptrs` is the device address of the ranks' symmetric buffer addresses, this kernel's
    region at `offset` in each (16-byte aligned). Collective: every rank of the group calls it
    with the same shapes and the same optional arguments present. `pushed`: the GEMV that
    computed `x` pushed it already (gemv_tma.py's `push`), on every rank."""
    if offset % ALIGN:
        raise ValueError(f"one_shot_add_norm's region must be {ALIGN}-byte aligned ({offset})")
    rows, width = x.shape
    summed = torch.empty_like(x)
    out = torch.empty_like(x) if normalised else None
    block = triton.next_power_of_2(width)
    norm_bias = None if rms else norm_bias
    _one_shot_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        summed,
        out if normalised else summed,
        weight if weight is not None else x,
        norm_bias if norm_bias is not None else x,
        bias if bias is not None else x,
        buffer_ptrs,
        residual.stride(0) if residual is not None else 0,
        width,
        eps,
        offset,
        RANK=rank,
        WORLD=world,
        RMS=rms,
        ADD=residual is not None,
        HAS_WEIGHT=weight is not None,
        HAS_NORM_BIAS=norm_bias is not None,
        HAS_BIAS=bias is not None,
        HALF=half_bytes(world),
        ROW=ROW_BYTES,
        ROWS=MAX_ROWS,
        BLOCK=block,
        num_warps=num_warps_for(block),
        PUSHED=pushed,
        NORM=normalised,
        **chained(x.device),
    )
    return out, summed
