"""The cascade's first pass: a decode step's queries over the prefix blocks their group shares.

`energon.parallel.shared_prefix` finds the groups; here one Triton program per (group, KV head,
part of the prefix) loads the queries of all the group's members (their query heads of that KV
head: a tile of members x heads per KV head rows, so the keys meet a tensor-core dot, not one
row each) and walks the prefix through the first member's block table, once. Each program writes
its rows' partial output and log-sum-exp as one more split of the decode kernel
(`energon.parallel.paged_attention`), which reads each sequence's keys past the prefix and folds
these partials into its combine. Launched right before it, by `paged_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from energon.kernels import sm_count
from energon.kernels.chain import chained, wait_then_release
from energon.parallel.key_tile import cache_strides, key_tile
from energon.parallel.shared_prefix import SharedPrefixes

MAX_ROWS = 64  # query rows of one program's tile: members x query heads per KV head
MIN_PART_LEN = 128  # keys per part of a prefix at least
MAX_PARTS = 8
PROGRAMS_PER_SM = 2


@triton.jit
def _prefix_kernel(
    Q,
    K,
    V,
    OutPart,
    LsePart,
    GroupSeqs,
    GroupSizes,
    GroupLens,
    BlockTables,
    ContextLens,
    CuSeqlens,
    Slopes,
    qk_scale,  # softmax scale * log2(e)
    first_part,  # the splits' index of this kernel's first part
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_gs,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MEMBERS: tl.constexpr,  # members a tile of rows holds (BLOCK_M // GROUP)
    PARTS: tl.constexpr,  # parts each prefix is cut into
    USE_ALIBI: tl.constexpr,
    IEEE: tl.constexpr,
    PDL: tl.constexpr,
):
    g = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2) % PARTS
    m0 = tl.program_id(2) // PARTS * MEMBERS  # this program's first member
    size = tl.load(GroupSizes + g)
    shared = tl.load(GroupLens + g)
    leader = tl.load(GroupSeqs + g * stride_gs)  # whose block table the prefix is read through
    part_len = tl.cdiv(tl.cdiv(shared, PARTS), BLOCK_N) * BLOCK_N
    start = part * part_len
    end = tl.minimum(start + part_len, shared)
    wait_then_release(PDL)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rows = tl.arange(0, BLOCK_M)
    head = kvh * GROUP + rows % GROUP
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slope += tl.load(Slopes + head).to(tl.float32) * 1.4426950408889634
    if m0 < size:  # a tile of members past this group's last is empty
        member = m0 + rows // GROUP
        row_ok = (rows < MEMBERS * GROUP) & (member < size)
        seq = tl.load(GroupSeqs + g * stride_gs + member, mask=row_ok, other=0)
        tok = tl.load(CuSeqlens + seq, mask=row_ok, other=0)  # its one new token
        q_pos = tl.load(ContextLens + seq, mask=row_ok, other=1) - 1
        q_at = tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(Q + q_at, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = key_tile(
                q, m_i, l_i, acc, n0, end, q_pos, d, d_ok, K, V, BlockTables, leader, kvh,
                qk_scale, slope, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                stride_vh, stride_bt, PAGE, BLOCK_N, USE_ALIBI, IEEE, True,
            )  # fmt: skip
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        at = first_part + part
        o_at = tok[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :]
        tl.store(OutPart + at * stride_ps + o_at, out, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LsePart + at * stride_ls + tok * stride_lt + head, lse, mask=row_ok)


def num_parts(num_groups: int, max_prefix_len: int, num_kv_heads: int, device: torch.device) -> int:
    """Parts each group's prefix is cut into: enough programs for about PROGRAMS_PER_SM per
    SM, at least MIN_PART_LEN keys a part of the longest prefix, at most MAX_PARTS."""
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count(device), num_groups * num_kv_heads)
    return max(1, min(want, triton.cdiv(max_prefix_len, MIN_PART_LEN), MAX_PARTS))


def prefix_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    shared: SharedPrefixes,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    qk_scale: float,
    slopes: torch.Tensor | None,
    out_part: torch.Tensor,
    lse_part: torch.Tensor,
    first_part: int,
    parts: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> None:
    """Writes the groups' members' partials over their shared prefixes into `out_part`
    [S, T, H, D] / `lse_part` [S, T, H] (fp32, log2 domain) at splits first_part ..
    first_part + parts - 1. q [T, H, D] of a decode step (one token a sequence); keys/values
    the cache's [num_blocks, block_size, Hkv, D] halves."""
    _, H, D = q.shape
    page, Hkv = keys.shape[1], keys.shape[2]
    group = H // Hkv
    block_m = max(16, min(triton.next_power_of_2(group * shared.group_seqs.shape[1]), MAX_ROWS))
    block_m = max(block_m, triton.next_power_of_2(group))
    tiles = triton.cdiv(shared.group_seqs.shape[1], block_m // group)  # of members
    _prefix_kernel[(shared.num_groups, Hkv, parts * tiles)](
        q,
        keys,
        values,
        out_part,
        lse_part,
        shared.group_seqs,
        shared.group_sizes,
        shared.group_lens,
        block_tables,
        context_lens,
        cu_seqlens,
        slopes if slopes is not None else q,
        qk_scale,
        first_part,
        q.stride(0),
        q.stride(1),
        *cache_strides(keys, values),
        block_tables.stride(0),
        shared.group_seqs.stride(0),
        out_part.stride(0),
        out_part.stride(1),
        out_part.stride(2),
        lse_part.stride(0),
        lse_part.stride(1),
        HEAD_DIM=D,
        GROUP=group,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        MEMBERS=block_m // group,
        PARTS=parts,
        USE_ALIBI=slopes is not None,
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
        **chained(q.device),
    )
