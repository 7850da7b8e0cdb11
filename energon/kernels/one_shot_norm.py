"""A row-parallel layer's all-reduce, bias, residual add and the norm after them, as one kernel.

At tp > 1 a decoder layer all-reduces twice (after attention's output projection and after the
MLP's down projection), and each sum goes straight into a residual add and a norm. As two
kernels (the one-shot all-reduce of energon/kernels/one_shot.py, then the add+norm of
norm_kernels.py) that is two launches and two round trips through memory per sum, 80 of each in a
40-layer decode step. Here one program per row does it all:

1. copies its row of `x` (this rank's partial product) into its slot in this rank's symmetric
   buffer, posts its call count to every peer and waits for theirs (the one-shot protocol of
   energon/kernels/one_shot.py, with one program per row instead of per 2 KB slice);
2. sums the row over the ranks in float32 in rank order, adds the bias and rounds once: the
   one-shot kernel's sum, bit for bit;
3. adds the residual (float32, rounded once: `x + residual`) and stores that sum, then normalises
   it with the norm kernel's own code (`norm_kernels.normalise`): the add+norm kernel's result,
   bit for bit.

Row `r` always lives at the same place (`ROW_BYTES` apart, whatever the width) and program `r`
counts its own calls, so calls of any row count may follow each other: a row's half is written
again only two of that row's calls later, after every peer has posted the call in between (the
argument of one_shot.py, per row). The region, from `offset` in the symmetric buffer: two halves
of MAX_ROWS rows, then the flags (MAX_ROWS * world uint32), then the counts (MAX_ROWS uint32),
zero at first (`region_bytes`). float16 only, like the one-shot kernel's use in
energon/parallel/allreduce.py, which decides when this runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from energon.kernels.norm_kernels import MAX_WIDTH, normalise, num_warps_for
from energon.kernels.one_shot import _thread_index, share_and_sum

MAX_ROWS = 64  # rows of one call: a decode step's batch up to 64 sequences
ROW_BYTES = MAX_WIDTH * 2  # float16 rows of up to MAX_WIDTH
HALF_BYTES = MAX_ROWS * ROW_BYTES
ALIGN = 16


def region_bytes(world: int) -> int:
    """Bytes of the symmetric buffer this kernel uses, from its offset."""
    return 2 * HALF_BYTES + 4 * MAX_ROWS * (world + 1)


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
    if x.dtype != torch.float16 or x.dim() != 2 or not x.is_contiguous():
        return False
    rows, width = x.shape
    if not (0 < rows <= MAX_ROWS and width <= MAX_WIDTH):
        return False
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
):
    tl.extra.cuda.gdc_launch_dependents()  # a GEMV launched after this one may start
    row = tl.program_id(0)
    dtype = X.dtype.element_ty
    table = buffers.to(tl.pointer_type(tl.uint64))
    flags_offset = offset + 2 * HALF
    counters = (tl.load(table + RANK) + flags_offset).to(tl.pointer_type(tl.uint32))
    counters += ROWS * WORLD
    call = tl.load(counters + row) + 1  # uint32: wraps
    slot = offset + (call % 2).to(tl.uint64) * HALF + row.to(tl.uint64) * ROW
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    X_row = X + row * width
    total = share_and_sum(X_row, table, slot, flags_offset, row, call, cols, mask, RANK, WORLD)
    if HAS_BIAS:
        total += tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32)
    summed = total.to(dtype)  # the all-reduce's result, rounded once
    if ADD:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0)
        summed = (summed.to(tl.float32) + r.to(tl.float32)).to(dtype)
    tl.store(Summed + row * width + cols, summed, mask=mask)
    y = normalise(summed, cols, mask, width, eps, Weight, NormBias, RMS, HAS_WEIGHT, HAS_NORM_BIAS)
    tl.store(Out + row * width + cols, y.to(dtype), mask=mask)
    if _thread_index() == 0:  # every thread read `call` before the barriers in share_and_sum
        tl.store(counters + row, call)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normed, summed): summed = the sum over ranks of x (+ bias) (+ residual), normed = its
    LayerNorm (RMSNorm when `rms`; norm_bias ignored then) by weight and norm_bias. Arguments
    as `takes` accepts them (its caller, OneShotAllReduce.fused_add_norm, has asked);
    `buffer_ptrs` is the device address of the ranks' symmetric buffer addresses, this kernel's
    region at `offset` in each (16-byte aligned). Collective: every rank of the group calls it
    with the same shapes and the same optional arguments present."""
    if offset % ALIGN:
        raise ValueError(f"one_shot_add_norm's region must be {ALIGN}-byte aligned ({offset})")
    rows, width = x.shape
    summed, out = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(width)
    norm_bias = None if rms else norm_bias
    _one_shot_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        summed,
        out,
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
        HALF=HALF_BYTES,
        ROW=ROW_BYTES,
        ROWS=MAX_ROWS,
        BLOCK=block,
        num_warps=num_warps_for(block),
    )
    return out, summed
