"""The decode GEMV spread evenly over a fixed number of programs (stream-K).

`gemv_kernels` gives each program BLOCK_N output features and the whole of K: a matrix of T
feature tiles runs T programs. Where T is not a multiple of the SMs the work per SM is uneven
(opt-13b's fc1 at tp=2: 160 tiles on 132 SMs, 28 SMs with two), and where T is below the SMs
(out_proj at tp=2 and 4: 80 tiles) the SMs left idle hold no loads in flight.

Here the T x I block iterations (I = K / BLOCK_K per tile) are cut into `programs` equal runs of
consecutive iterations, tile after tile: every program streams the same bytes, and a tile may be
shared by consecutive programs. A program that covers a whole tile stores it as gemv_kernels
does; each sharer of a tile stores its fp32 partial sums and takes a ticket, and the last to
arrive adds every sharer's partials (in sharer order, so the result is the same bits whoever
arrives last), applies bias and ReLU, stores the tile and resets the ticket for the next call.

The partials and tickets are one buffer each per device, kept across calls (each call leaves
its tickets at zero), grown outside CUDA graph capture. Kernels touch them only after their
chain wait (energon/kernels/chain.py), so two calls on one stream never use them at once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from energon.kernels.chain import launch_options, wait_then_release


@triton.jit
def _gemv_stream_k_kernel(
    X,
    W,
    Bias,
    Y,
    Partials,
    Tickets,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    iters,  # K tiles of one output tile
    total,  # iterations of the whole call: output tiles x iters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PARTS: tl.constexpr,  # sharers of one tile at most (a power of two)
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    it = pid * total // programs
    end = (pid + 1) * total // programs
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    local = tl.arange(0, BLOCK_N)
    wait_then_release(PDL)  # x is ready, y, the partials and the tickets are free
    while it < end:
        tile = it // iters
        first = tile * iters
        stop = tl.minimum(first + iters, end)
        n = tile * BLOCK_N + local
        n_ok = n < N
        if HAS_BIAS:  # loaded before the stream: not one more round trip at the end
            bias = tl.load(Bias + n, mask=n_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i in range(it, stop):
            k = (i - first) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :])
            w = tl.load(W + n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :])
            acc += tl.dot(x, tl.trans(w))
        done = (it == first) & (stop == first + iters)  # this program holds the whole tile
        if (it != first) | (stop != first + iters):
            # the programs sharing this tile: those whose runs hold its first and last iteration
            lead = ((first + 1) * programs + total - 1) // total - 1
            sharers = ((first + iters) * programs + total - 1) // total - lead
            slot = (tile * PARTS + (pid - lead)) * BLOCK_M
            mine = Partials + (slot + m)[:, None] * BLOCK_N + local[None, :]
            tl.store(mine, acc, mask=m_ok[:, None])
            tl.debug_barrier()  # every thread's partials are stored before the ticket is taken
            ticket = tl.atomic_add(Tickets + tile, 1, sem="acq_rel")
            done = ticket == sharers - 1  # the last sharer to arrive adds them all, in order
            if done:
                p = tl.arange(0, PARTS)
                rows = (tile * PARTS + p)[:, None] * BLOCK_M + m[None, :]
                ptrs = Partials + rows[:, :, None] * BLOCK_N + local[None, None, :]
                ok = (p < sharers)[:, None, None] & m_ok[None, :, None]
                acc = tl.sum(tl.load(ptrs, mask=ok, other=0.0, cache_modifier=".cg"), 0)
                tl.atomic_xchg(Tickets + tile, 0)
        if done:
            if HAS_BIAS:
                acc += bias[None, :]
            if RELU:
                acc = tl.maximum(acc, 0.0)
            y_ptrs = Y + m[:, None] * stride_ym + n[None, :]
            tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        it = stop


def max_sharers(tiles: int, iters: int, programs: int) -> int:
    """The most programs one tile is shared by when tiles x iters iterations are cut into
    `programs` runs of floor or ceil(total / programs) consecutive iterations."""
    shortest = tiles * iters // programs
    return min(programs, -(-(iters - 1) // shortest) + 1) if shortest else programs


_SCRATCH: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def scratch(device: torch.device, partials: int, tickets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials, zeroed int32 tickets) of at least these sizes on `device`: one pair per
    device, kept; a grown pair never frees the one before (CUDA graphs captured earlier still
    use it). Raises RuntimeError if it must grow while a CUDA graph is captured."""
    pairs = _SCRATCH.setdefault(device, [])
    if not pairs or pairs[-1][0].numel() < partials or pairs[-1][1].numel() < tickets:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"the stream-K GEMV needs {partials} partials and {tickets} tickets while a CUDA "
                "graph is captured; run the same call once before capturing"
            )
        partials = max(partials, pairs[-1][0].numel() if pairs else 0, 1 << 20)
        tickets = max(tickets, pairs[-1][1].numel() if pairs else 0, 4096)
        pairs.append(
            (
                torch.empty(partials, dtype=torch.float32, device=device),
                torch.zeros(tickets, dtype=torch.int32, device=device),
            )
        )
    return pairs[-1]


@functools.cache
def _plan(n: int, k: int, block_n: int, block_k: int, programs: int) -> tuple[int, int, int, int]:
    """(iters a tile, total iterations, programs, sharers a tile at most as a power of two)."""
    tiles, iters = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    total = tiles * iters
    programs = min(programs, total)
    return iters, total, programs, triton.next_power_of_2(max_sharers(tiles, iters, programs))


def gemv_stream_k(
    x, weight, bias, relu, y, programs, block_m, block_n, block_k, num_warps, num_stages, pdl
):
    """Writes x @ weight.T (+ bias) (ReLU) into y [M, N] with `programs` programs (arguments
    checked by gemv_kernels.gemv)."""
    M, K = x.shape
    N = weight.shape[0]
    iters, total, programs, parts = _plan(N, K, block_n, block_k, programs)
    tiles = triton.cdiv(N, block_n)
    partials, tickets = scratch(x.device, tiles * parts * block_m * block_n, tiles)
    _gemv_stream_k_kernel[(programs,)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        partials,
        tickets,
        M,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        iters,
        total,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PARTS=parts,
        HAS_BIAS=bias is not None,
        RELU=relu,
        num_warps=num_warps,
        num_stages=num_stages,
        **launch_options(pdl),
    )
    return y
