"""Each row's argmax as one Triton kernel: the first index of the row's largest value, as
`torch.argmax` answers it (a NaN counts as larger than any number, the first NaN wins).

One program a row walks it in BLOCK-wide pieces, keeping the largest value so far and its first
index: a decode step's few rows of a 50k-128k vocabulary cost one short kernel where torch's
reduction cost 13-14 us at batch 1 on an H200 (docs/benchmarks.md, "Engine generation"), and the
kernel is captured into the decode graph. `energon.kernels.argmax` decides when it runs; works
in the interpreter (TRITON_INTERPRET=1: the cpu tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from energon.kernels.chain import chained, wait_then_release

BLOCK = 8192  # columns a step (16 warps: 16 a thread)
NUM_WARPS = 16


@triton.jit
def _argmax_kernel(X, Out, width, stride, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    wait_then_release(PDL)
    best = tl.full([], float("-inf"), tl.float32)
    best_at = tl.full([], 0, tl.int32)
    best_nan = tl.full([], 0, tl.int32)  # a NaN seen: best_at is the first one's
    for start in range(0, width, BLOCK):
        at = start + cols
        x = tl.load(X + row * stride + at, mask=at < width, other=float("-inf")).to(tl.float32)
        nan = x != x
        # the first NaN of the piece, if any (its index among the piece's, else BLOCK)
        first_nan = tl.min(tl.where(nan, cols, BLOCK), 0)
        value, index = tl.max(
            tl.where(nan, float("-inf"), x),
            0,
            return_indices=True,
            return_indices_tie_break_left=True,
        )
        take_nan = (best_nan == 0) & (first_nan < BLOCK)
        take_value = (best_nan == 0) & (first_nan == BLOCK) & (value > best)
        best_at = tl.where(
            take_nan, start + first_nan, tl.where(take_value, start + index, best_at)
        )
        best = tl.where(take_value, value, best)
        best_nan = tl.where(take_nan, 1, best_nan)
    tl.store(Out + row, best_at.to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: the first index of each row's largest value of a 2-D tensor with dense
    rows (stride(1) == 1), as torch.argmax(x, dim=-1)."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"argmax_rows takes a 2-D tensor with dense rows (got {tuple(x.shape)})")
    rows, width = x.shape
    if rows and not width:
        raise ValueError("argmax_rows of rows with no columns")
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows:
        _argmax_kernel[(rows,)](
            x,
            out,
            width,
            x.stride(0),
            BLOCK=min(BLOCK, triton.next_power_of_2(width)),
            num_warps=NUM_WARPS,
            **chained(x.device),
        )
    return out
