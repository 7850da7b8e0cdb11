"""What the paged-attention kernels share: the step they take for one tile of keys (Triton)
and the cache operands and strides they are launched with.

`paged_attention.py` (decode-like steps) and `paged_prefill.py` (prompts after cached keys)
walk a sequence's block table in tiles of BLOCK_N keys; for each, `key_tile` loads K and V from
the cache pages where they lie and folds the tile into an online softmax in fp32, scores in the
log2 domain (the caller scales by softmax scale * log2(e)). Triton inlines it into each kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels' scores are in the log2 domain


def cache_operands(q: torch.Tensor, kv_cache: torch.Tensor):
    """(q with a contiguous head_dim, keys, values, block size, KV heads) for a kernel launch;
    ValueError when q [T, H, D] does not fit kv_cache [2, num_blocks, block_size, Hkv, D] (D
    differs, or H is not a multiple of Hkv) or the cache's head_dim is not contiguous."""
    _, H, D = q.shape
    _, _, page, Hkv, Dk = kv_cache.shape
    if Dk != D or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    keys, values = kv_cache[0], kv_cache[1]
    if keys.stride(-1) != 1:
        raise ValueError("kv_cache needs a contiguous head_dim")
    q = q if q.stride(-1) == 1 else q.contiguous()
    return q, keys, values, page, Hkv


def cache_strides(keys: torch.Tensor, values: torch.Tensor) -> tuple[int, ...]:
    """The kernels' cache strides: block, slot and KV head of `keys`, then of `values`."""
    return (*keys.stride()[:3], *values.stride()[:3])


@triton.jit
def key_tile(
    q, m_i, l_i, acc, n0, hi, q_pos, d, d_ok, K, V, BlockTables, seq, kvh, qk_scale, slope,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, USE_ALIBI: tl.constexpr, IEEE: tl.constexpr,
    CAUSAL: tl.constexpr,  # some keys of the tile lie past some rows' queries
):  # fmt: skip
    """One key tile (keys n0 .. n0 + BLOCK_N - 1, those below `hi`) of the paged cache into the
    online softmax of the query rows `q` [rows, BLOCK_D] at positions `q_pos` [rows]: returns
    the new (row maxima, row sums, accumulator). `slope` [rows]: each row's ALiBi slope in the
    log2 domain (with USE_ALIBI)."""
    n = n0 + tl.arange(0, BLOCK_N)
    n_ok = n < hi
    page = tl.load(BlockTables + seq * stride_bt + n // PAGE, mask=n_ok, other=0).to(tl.int64)
    slot = n % PAGE
    k_ptrs = K + page[None, :] * stride_kb + slot[None, :] * stride_ks + kvh * stride_kh
    k = tl.load(k_ptrs + d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
    k = k.to(q.dtype)  # [BLOCK_D, BLOCK_N]
    if IEEE:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale
    if USE_ALIBI:
        s += slope[:, None] * (n[None, :] - q_pos[:, None]).to(tl.float32)
    if CAUSAL:
        s = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)

    v_ptrs = V + page[:, None] * stride_vb + slot[:, None] * stride_vs + kvh * stride_vh
    v = tl.load(v_ptrs + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = v.to(q.dtype)  # [BLOCK_N, BLOCK_D]
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv
