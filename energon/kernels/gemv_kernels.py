"""Triton kernel of `energon.kernels.gemv`: y = x @ W.T (+ bias) (then ReLU) for a few rows of x.

A decode step at small batch reads every weight once for a handful of rows: the GEMM is a
stream of the weight matrix, and what counts is keeping HBM busy. Each program owns BLOCK_N
output features and walks K in BLOCK_K tiles (Triton pipelines the loads over `num_stages`);
the rows of x (at most 16) are padded to one tensor-core tile, accumulated in fp32, and the
bias and activation are applied before the one store. No split-K, so no second reduction
kernel.

With `pdl` (Hopper and later, CUDA only) the kernel is launched as a programmatic dependent
launch, like every Triton kernel of a decode step (energon/kernels/chain.py): it may start while
the kernel before it still runs, loads its bias and prefetches the first PREFETCH_TILES tiles of
its weights into L2 (no kernel writes either), and only then waits for the kernel before it to
finish and reads x (the bias loaded after the weight stream was one more round trip at the end of
every call: 0.10 ms a token for opt-13b, with the norms' weights likewise; docs/benchmarks.md).
So the previous kernel's tail and this one's launch overlap. Nothing is written before the wait.
The Engine prefetches nothing (PREFETCH_TILES = 0): on two H200s the batch-1 decode at tp=1 took
0.05-0.13 ms a token less without the 4 tiles it fetched before (opt-13b 7.12 against 7.21 ms,
llama-2-13b 7.12 against 7.20), and deeper prefetches had lost 0.07-0.16 ms at tp=2
(docs/benchmarks.md, "Engine generation").

Imported only on CUDA (energon.kernels.triton_module), and by the interpreter tests.
"""

from __future__ import annotations

import triton
import triton.language as tl

from energon.kernels.chain import launch_options, wait_then_release
from energon.kernels.gemv import MAX_ROWS

PREFETCH_TILES = 0  # weight tiles per program fetched into L2 before waiting for x (default)
LINE = tl.constexpr(64)  # fp16 / bf16 elements per 128-byte cache line


@triton.jit
def _prefetch_l2(ptrs):
    """Fetches the lines at `ptrs` into L2 (results unused; not removed as dead code)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _gemv_kernel(
    X,
    W,
    Bias,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    prefetch,  # with PDL: weight tiles fetched into L2 before the wait (0: none)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok = n < N
    m_ok = m < M
    if PDL:
        lines = tl.arange(0, BLOCK_K // LINE) * LINE
        rows = W + tl.minimum(n, N - 1)[:, None] * stride_wn  # clamped: no prefetch past the end
        for t in range(0, prefetch):
            _prefetch_l2(rows + tl.minimum(t * BLOCK_K + lines, K - 1)[None, :])
    if HAS_BIAS:  # no kernel writes it: loaded now, it is not one more round trip at the end
        bias = tl.load(Bias + n, mask=n_ok, other=0.0).to(tl.float32)
    wait_then_release(PDL)  # the kernel before has finished: x is ready, y is free
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :])
        w = tl.load(W + n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :])
        acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += bias[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y_ptrs = Y + m[:, None] * stride_ym + n[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemv(
    x,
    weight,
    bias=None,
    relu=False,
    block_n=None,
    block_k=None,
    num_warps=4,
    num_stages=None,
    pdl=False,
    prefetch_tiles=PREFETCH_TILES,
):
    """x [M, K] (M <= MAX_ROWS, rows dense) @ weight[N, K].T (+ bias [N]) (ReLU) -> [M, N] in
    x's dtype. `pdl`: a programmatic dependent launch (module docstring; CUDA sm_90+ only),
    fetching `prefetch_tiles` weight tiles into L2 before it waits."""
    import torch

    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS or weight.shape[1] != K or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"gemv takes x [<= {MAX_ROWS}, K] and weight [N, K], dense rows")
    if prefetch_tiles < 0:
        raise ValueError(f"prefetch_tiles must be >= 0 (got {prefetch_tiles})")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    # From the H200 sweep (docs/benchmarks.md, "Decode GEMV"): wide tiles while they still
    # make ~80 programs; deeper pipelines of longer K tiles for the narrower outputs.
    block_n = block_n or next((b for b in (64, 32) if triton.cdiv(N, b) >= 80), 16)
    block_k = block_k or (256 if N <= 8192 else 128)
    num_stages = num_stages or (5 if N <= 8192 else 3)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        M,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        prefetch_tiles if pdl else 0,
        BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        HAS_BIAS=bias is not None,
        RELU=relu,
        num_warps=num_warps,
        num_stages=num_stages,
        **launch_options(pdl),
    )
    return y
