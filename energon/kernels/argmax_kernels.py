"""Each row's argmax as one Triton kernel: the first index of the row's largest value, as
`torch.argmax` answers it (a NaN counts as larger than any number, the first NaN wins).

A row is cut into CHUNK-wide pieces, one program each: it stores its piece's largest value and
first index (or its first NaN), takes a ticket (energon/kernels/tickets.py), and the row's last
program to arrive picks among the pieces, the earliest on a tie. A decode step's row of a 50k
vocabulary is 13 programs of one load each; one program walking the row took 9-10 us on an H200
and torch's reduction 13-14 us plus its launch after the graph (docs/benchmarks.md, "Engine
generation"). The kernel is captured into the decode graph after the LM head.
`energon.kernels.argmax` decides when it runs; works in the interpreter (TRITON_INTERPRET=1:
the cpu tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from energon.kernels.chain import chained, wait_then_release
from energon.kernels.tickets import tickets

CHUNK = 4096  # columns a program (4 warps: 32 a thread)
NUM_WARPS = 4


@triton.jit
def _argmax_kernel(
    X,
    Out,
    PartValue,
    PartIndex,
    Tickets,
    width,
    stride,
    CHUNK: tl.constexpr,
    PIECES: tl.constexpr,  # pieces a row, rounded up to a power of two
    PDL: tl.constexpr,
):
    row = tl.program_id(0)
    piece = tl.program_id(1)
    pieces = tl.num_programs(1)
    cols = piece * CHUNK + tl.arange(0, CHUNK)
    wait_then_release(PDL)
    x = tl.load(X + row * stride + cols, mask=cols < width, other=float("-inf")).to(tl.float32)
    nan = x != x
    first_nan = tl.min(tl.where(nan, cols, width), 0)
    x = tl.where(nan, float("-inf"), x)
    value = tl.max(x, 0)
    first_max = tl.min(tl.where((x == value) & (cols < width), cols, width), 0)
    # a piece with a NaN stores -(its first NaN's column) - 1
    index = tl.where(first_nan < width, -first_nan - 1, first_max)
    tl.store(PartValue + row * pieces + piece, value)
    tl.store(PartIndex + row * pieces + piece, index)
    tl.debug_barrier()  # stored before the ticket is taken
    ticket = tl.atomic_add(Tickets + row, 1, sem="acq_rel")
    if ticket == pieces - 1:
        s = tl.arange(0, PIECES)
        ok = s < pieces
        indices = tl.load(PartIndex + row * pieces + s, mask=ok, other=0, cache_modifier=".cg")
        values = tl.load(PartValue + row * pieces + s, mask=ok, other=0.0, cache_modifier=".cg")
        values = tl.where(ok & (indices >= 0), values, float("-inf"))
        first_nan_piece = tl.min(tl.where(ok & (indices < 0), s, PIECES), 0)
        best = tl.min(tl.where(values == tl.max(values, 0), s, PIECES), 0)  # the earliest
        pick = tl.where(first_nan_piece < PIECES, first_nan_piece, best)
        chosen = tl.sum(tl.where(s == pick, indices, 0), 0)
        tl.store(Out + row, tl.where(chosen < 0, -chosen - 1, chosen).to(tl.int64))
        tl.atomic_xchg(Tickets + row, 0)


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
        pieces = triton.cdiv(width, CHUNK)
        value = torch.empty(rows * pieces, dtype=torch.float32, device=x.device)
        index = torch.empty(rows * pieces, dtype=torch.int32, device=x.device)
        _argmax_kernel[(rows, pieces)](
            x,
            out,
            value,
            index,
            tickets(x.device, rows, "argmax_rows"),
            width,
            x.stride(0),
            CHUNK=min(CHUNK, triton.next_power_of_2(width)),
            PIECES=triton.next_power_of_2(pieces),
            num_warps=NUM_WARPS,
            **chained(x.device),
        )
    return out
