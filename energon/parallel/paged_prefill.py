"""Prefill attention straight over the paged KV cache: a Triton kernel (flash-attention style).

A step's queries read keys they did not bring themselves when a prompt continues after cached
tokens: a prefix found in the prefix cache, the second chunk of a long prompt (chunked
prefill), a preempted sequence's recompute after its cached prefix. Torch's flash varlen
kernel reads a paged cache only from torch 2.13 (`block_table`); before, and for ALiBi models
always, `Attention` gathered every sequence's keys into a dense [B, max_context_len] grid and
ran SDPA with an explicit mask: on an H200 1.85 ms a layer for 64 prompts of 64 new tokens
after a 1,024-token cached prefix (opt-13b heads), about 74 ms of a 40-layer step for what is
~0.3 ms of key reads and ~3 us of matrix products.

One program per (tile of BLOCK_M new tokens, sequence, query head). It loads its queries once,
walks the sequence's block table in key tiles of BLOCK_N up to its last query's position (keys
past it are never read: the causal cut), reads each tile's K and V from the cache pages where
they lie, and keeps an online softmax in fp32 (scores in the log2 domain). A query at position p
sees keys 0..p; ALiBi adds slope * (key_pos - query_pos). Tiles past a sequence's new tokens do
nothing (the grid is sized by the longest sequence's, `max_seqlen_q`, a host int). The cache
must already hold the step's new keys and values (`Attention` writes them first).

The decode-like steps (a few new tokens per sequence) go to `energon.parallel.paged_attention`,
which splits long contexts over programs instead; this kernel is for many new tokens a sequence.

Works in Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported: the tests
run it on CPU tensors that way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from energon.parallel.key_tile import LOG2E, cache_operands, cache_strides, key_tile


@triton.jit
def _paged_prefill_kernel(
    Q,
    K,
    V,
    Out,
    BlockTables,
    ContextLens,
    CuSeqlens,
    Slopes,
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_bt,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    PAGE: tl.constexpr,  # cache block size
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_ALIBI: tl.constexpr,
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots, not tf32
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kvh = head // GROUP
    ctx = tl.load(ContextLens + seq)
    q_start = tl.load(CuSeqlens + seq)
    q_len = tl.load(CuSeqlens + seq + 1) - q_start
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # which new token of the sequence
    m_ok = m < q_len
    q_pos = ctx - q_len + m  # absolute position of each row's query
    # keys up to this tile's last query; none for a tile past the sequence's new tokens
    hi = tl.where(tile * BLOCK_M < q_len, tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_M), 0)

    q_ptrs = Q + (q_start + m)[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)  # the head's ALiBi slope, every row
    if USE_ALIBI:
        slope += tl.load(Slopes + head).to(tl.float32) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key tiles every row of the tile sees whole (up to its first query) need no causal mask;
    # the rest, up to its last query, do.
    lo = tl.minimum((ctx - q_len + tile * BLOCK_M + 1) // BLOCK_N * BLOCK_N, hi)
    for n0 in range(0, lo, BLOCK_N):
        m_i, l_i, acc = key_tile(
            q, m_i, l_i, acc, n0, hi, q_pos, d, d_ok, K, V, BlockTables, seq, kvh, qk_scale,
            slope, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
            PAGE, BLOCK_N, USE_ALIBI, IEEE, False,
        )  # fmt: skip
    for n0 in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = key_tile(
            q, m_i, l_i, acc, n0, hi, q_pos, d, d_ok, K, V, BlockTables, seq, kvh, qk_scale,
            slope, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
            PAGE, BLOCK_N, USE_ALIBI, IEEE, True,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = Out + (q_start + m)[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def supports(q: torch.Tensor, head_dim: int) -> bool:
    """Whether `paged_prefill` takes this call on a GPU: CUDA, fp16/bf16, head_dim <= 256."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256


def paged_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen_q: int,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries over the paged cache; returns [T, H, D] in q's dtype.

    q [T, H, D] (the new tokens, sequence after sequence as `cu_seqlens` [B+1] says); kv_cache
    [2, num_blocks, block_size, Hkv, D], already holding the new tokens' K/V; block_tables int
    [B, max_blocks]; context_lens int [B] (keys visible to each sequence, new ones included: its
    queries sit at the last positions); alibi_slopes float [H] or None. `max_seqlen_q` is a host
    int (nothing is read back from the device, so a CUDA graph can hold the call).
    """
    T, H, D = q.shape
    q, keys, values, page, Hkv = cache_operands(q, kv_cache)
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    B = context_lens.shape[0]
    if T == 0 or B == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D))
    block_m = block_m or (64 if block_d <= 128 else 32)
    block_n = block_n or 32
    num_stages = num_stages or (3 if block_d <= 128 else 2)
    slopes = alibi_slopes.to(q.device, torch.float32) if alibi_slopes is not None else out
    grid = (triton.cdiv(max_seqlen_q, block_m), B, H)
    _paged_prefill_kernel[grid](
        q,
        keys,
        values,
        out,
        block_tables,
        context_lens,
        cu_seqlens,
        slopes,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *cache_strides(keys, values),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        HEAD_DIM=D,
        GROUP=H // Hkv,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        USE_ALIBI=alibi_slopes is not None,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps or 4,
        num_stages=num_stages,
    )
    return out
