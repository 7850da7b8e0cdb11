"""Decode attention straight over the paged KV cache: a Triton kernel (flash-decoding style).

`Attention` uses it for decode-like steps (every sequence has at most `MAX_QUERY_LEN` new tokens)
on CUDA in fp16/bf16 when the flash varlen kernel cannot read the paged cache. Instead of
gathering every sequence's keys into a dense grid, each program walks one sequence's block table
and reads K/V tiles from the cache pages where they lie.

One program per (sequence, KV head, context split). Its rows are that KV head's query heads
(GQA) times the sequence's new tokens, padded to a tensor-core tile of at least 16 rows; the keys
go by in tiles of `BLOCK_N` with an online softmax in fp32 (scores in the log2 domain). A query
at position p sees keys 0..p, so several new tokens per sequence stay causal; ALiBi adds
slope * (key_pos - query_pos). When the batch has too few (sequence, KV head) pairs to fill the
GPU, each sequence's context is cut into `num_splits` equal pieces (whole key tiles; the cut is
made on the device from the sequence's own length, so a CUDA graph captured for the longest
context still spreads a short one over every split), each program writes its partial output and
log-sum-exp, and the last program of a (sequence, KV head) to finish, counted by an atomic
ticket, combines them (every split's partials in one load, not one split after another: at
batch 1 that chain of loads cost up to 3.5 of 11.5 us on an H200). Given the new tokens' k and
v the kernel also writes them into their cache slots first (each program the new tokens inside
its split), so one kernel is a layer's whole decode attention: a decode step at batch 1 is
latency-bound, and each kernel boundary costs a few microseconds in a CUDA graph.

With `shared` (groups of sequences whose tables begin with the same cached blocks) a pass over
each group's prefix runs first (`energon.parallel.prefix_attention`) and writes its partials
after the splits'; each program here then reads its sequence's keys past the prefix only and
takes those partials in: in the split combine, or, unsplit, as the online softmax's start.

Works with triton 3.6+ and in the interpreter (TRITON_INTERPRET=1 set before this module is
imported: the tests run the kernels on CPU tensors that way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from energon.kernels import sm_count
from energon.kernels.chain import chained, wait_then_release
from energon.kernels.tickets import tickets as ticket_counters
from energon.parallel.key_tile import LOG2E, cache_operands, cache_strides, key_tile
from energon.parallel.prefix_attention import num_parts, prefix_attention
from energon.parallel.shared_prefix import SharedPrefixes

MAX_QUERY_LEN = 8  # new tokens per sequence up to which a step counts as decode-like
MAX_ROWS = 128  # query rows of one program: heads per KV head x new tokens
MIN_SPLIT_LEN = 64  # keys per split at least, when the context is split
MAX_SPLITS = 16
PROGRAMS_PER_SM = 2  # splits aim at about this many programs per SM
COMBINE_ELEMENTS = 4096  # partial outputs one combine step loads at once (splits x rows x dim)
# (block_n, num_warps, num_stages) after a prefix pass, unsplit, with at least
# SHARED_CONFIG_PROGRAMS_PER_SM (sequence, KV head) programs an SM: a program reads few keys of
# its own, so smaller programs, more of them on an SM (H200, opt-13b shapes, ctx 1,088 of which
# 1,024 shared: 175 against 222 us at batch 256 and 60 against 68 at 64 with the default 64 / 4;
# with 1,088 keys of its own 6 % slower at 64, 16 % at batch 8, which the threshold leaves out)
SHARED_CONFIG = (32, 2, 2)
SHARED_CONFIG_PROGRAMS_PER_SM = 4
FOLD_ELEMENTS = 8192  # prefix partials an unsplit program starts from at most (parts x rows x dim)


@triton.jit
def _paged_attn_kernel(
    Q,
    K,
    V,
    Out,
    OutPart,
    LsePart,
    Tickets,
    KNew,
    VNew,
    SlotMapping,
    BlockTables,
    ContextLens,
    CuSeqlens,
    Slopes,
    PrefixLens,
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_nt,
    stride_nh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_ps,
    stride_pt,
    stride_ph,
    stride_ls,
    stride_lt,
    HEAD_DIM: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    PAGE: tl.constexpr,  # cache block size
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MAX_Q: tl.constexpr,  # new tokens per sequence at most (a power of two)
    USE_ALIBI: tl.constexpr,
    WRITE: tl.constexpr,  # write the new tokens' K/V (KNew, VNew) into the cache first
    SPLIT: tl.constexpr,  # partials, and the last split of a (sequence, KV head) combines them
    SPLITS: tl.constexpr,  # with SPLIT: the splits' count rounded up to a power of two
    PREFIX_PARTS: tl.constexpr,  # splits after ours that hold a shared prefix's partials
    FOLD: tl.constexpr,  # unsplit: start from those partials (no combine after)
    VALID_M: tl.constexpr,  # rows that can hold a query (heads per KV head x new tokens, pow2)
    COMBINE_M: tl.constexpr,  # rows combined at a time
    IEEE: tl.constexpr,  # fp32 inputs: full-precision dots, not tf32
    PDL: tl.constexpr,  # a programmatic dependent launch (energon/kernels/chain.py)
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    ctx = tl.load(ContextLens + seq)
    q_start = tl.load(CuSeqlens + seq)
    q_len = tl.load(CuSeqlens + seq + 1) - q_start
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    # this sequence's context (past the keys its group's prefix pass reads, if any) in
    # num_splits pieces of whole key tiles (the last ones may be empty)
    lo = 0
    if PREFIX_PARTS > 0:
        lo = tl.load(PrefixLens + seq)
    split_len = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * split_len
    end = tl.minimum(start + split_len, ctx)
    wait_then_release(PDL)  # the step's lengths are read; q, k and v come from the kernel before

    rows = tl.arange(0, BLOCK_M)
    tok = rows // GROUP  # which new token of the sequence
    head = kvh * GROUP + rows % GROUP
    row_ok = tok < q_len
    q_pos = ctx - q_len + tok  # absolute position of each row's query
    # q before the cache write below: its round trip overlaps the new k and v's, not after
    # the write's barrier
    q_ptrs = Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if WRITE:  # the new tokens whose positions fall in this split: into their cache slots
        j = tl.arange(0, MAX_Q)
        j_ok = (j < q_len) & (ctx - q_len + j >= start) & (ctx - q_len + j < end)
        w_slot = tl.load(SlotMapping + q_start + j, mask=j_ok, other=0).to(tl.int64)
        w_mask = j_ok[:, None] & d_ok[None, :]
        src = (q_start + j)[:, None] * stride_nt + kvh * stride_nh + d[None, :]
        k_new = tl.load(KNew + src, mask=w_mask, other=0.0)
        v_new = tl.load(VNew + src, mask=w_mask, other=0.0)
        k_dst = (w_slot // PAGE)[:, None] * stride_kb + (w_slot % PAGE)[:, None] * stride_ks
        v_dst = (w_slot // PAGE)[:, None] * stride_vb + (w_slot % PAGE)[:, None] * stride_vs
        tl.store(K + k_dst + kvh * stride_kh + d[None, :], k_new.to(K.dtype.element_ty), w_mask)
        tl.store(V + v_dst + kvh * stride_vh + d[None, :], v_new.to(V.dtype.element_ty), w_mask)
        tl.debug_barrier()  # the program's own reads below see these slots

    slope = tl.zeros([BLOCK_M], dtype=tl.float32)  # each row's head's ALiBi slope
    if USE_ALIBI:
        slope += tl.load(Slopes + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if FOLD:
        # (One new token a sequence.) The prefix pass's partials (the slices after the one
        # split's) as the online softmax's start, row by row: m = the row's parts' largest
        # log-sum-exp, l = their masses relative to it, acc = their outputs times those;
        # each row's parts in one load, all issued here, where their round trips overlap the
        # first keys'. (A sequence outside the groups starts empty.) No partial, ticket or
        # combine after: a program after a shared prefix has few keys of its own, and those
        # round trips were most of its time (docs/benchmarks.md, "Shared-prefix decode").
        s = tl.arange(0, SPLITS)
        s_ok = s < tl.where(lo > 0, PREFIX_PARTS, 0)
        for r in tl.static_range(GROUP):  # the rows of the one new token's heads
            r_at = q_start * stride_lt + kvh * GROUP + r
            lse_r = tl.load(
                LsePart + (num_splits + s) * stride_ls + r_at, mask=s_ok, other=float("-inf")
            )
            o_at = q_start * stride_pt + (kvh * GROUP + r) * stride_ph
            o_ptrs = OutPart + (num_splits + s)[:, None] * stride_ps + o_at + d[None, :]
            o_r = tl.load(o_ptrs, mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [SPLITS, D]
            m_r = tl.max(lse_r, 0)
            w_r = tl.exp2(lse_r - tl.where(m_r == float("-inf"), 0.0, m_r))
            here = rows == r
            m_i = tl.where(here, m_r, m_i)
            l_i = tl.where(here, tl.sum(w_r, 0), l_i)
            acc = tl.where(here[:, None], tl.sum(w_r[:, None] * o_r, 0)[None, :], acc)

    for n0 in range(start, end, BLOCK_N):
        m_i, l_i, acc = key_tile(
            q, m_i, l_i, acc, n0, end, q_pos, d, d_ok, K, V, BlockTables, seq, kvh, qk_scale,
            slope, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
            PAGE, BLOCK_N, USE_ALIBI, IEEE, True,
        )  # fmt: skip

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part = (q_start + tok)[:, None] * stride_pt + head[:, None] * stride_ph + d[None, :]
        tl.store(OutPart + split * stride_ps + part, out, mask=o_mask)
        lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
        lse_at = (q_start + tok) * stride_lt + head
        tl.store(LsePart + split * stride_ls + lse_at, lse, mask=row_ok)
        # The last program of this (sequence, KV head) to arrive sums the splits' partials,
        # weighted by their share of the softmax mass, and resets the ticket for the next call.
        tl.debug_barrier()  # every thread's partials are stored before the ticket is taken
        ticket = tl.atomic_add(Tickets + seq * tl.num_programs(1) + kvh, 1, sem="acq_rel")
        if ticket == num_splits - 1:
            # every split's log-sum-exp and partial output loaded at once ([SPLITS, rows] and
            # [SPLITS, rows, D], COMBINE_M rows at a time): one round trip, not one per split
            s = tl.arange(0, SPLITS)
            parts = num_splits
            if PREFIX_PARTS > 0:  # and the prefix pass's, for a sequence in a group
                parts += tl.where(lo > 0, PREFIX_PARTS, 0)
            s_ok = s < parts
            for c0 in tl.static_range(0, VALID_M, COMBINE_M):
                r = c0 + tl.arange(0, COMBINE_M)
                r_tok = r // GROUP
                r_ok = r_tok < q_len
                r_head = kvh * GROUP + r % GROUP
                r_lse = (q_start + r_tok) * stride_lt + r_head
                lse_ptrs = LsePart + s[:, None] * stride_ls + r_lse[None, :]
                lse_ok = s_ok[:, None] & r_ok[None, :]
                lse_i = tl.load(lse_ptrs, mask=lse_ok, other=float("-inf"), cache_modifier=".cg")
                m_all = tl.max(lse_i, 0)
                m_ref = tl.where(m_all == float("-inf"), 0.0, m_all)  # empty splits weigh 0
                w = tl.exp2(lse_i - m_ref[None, :])  # [SPLITS, COMBINE_M]
                w_sum = tl.sum(w, 0)
                r_part = (q_start + r_tok) * stride_pt + r_head * stride_ph
                part_ptrs = OutPart + s[:, None, None] * stride_ps + r_part[None, :, None]
                part_ok = lse_ok[:, :, None] & d_ok[None, None, :]
                parts = tl.load(part_ptrs + d, mask=part_ok, other=0.0, cache_modifier=".cg")
                total = tl.sum(w[:, :, None] * parts, 0)  # [COMBINE_M, D]
                out_c = total / tl.where(w_sum > 0.0, w_sum, 1.0)[:, None]
                r_out = (q_start + r_tok) * stride_ot + r_head * stride_oh
                c_mask = r_ok[:, None] & d_ok[None, :]
                tl.store(Out + r_out[:, None] + d[None, :], out_c.to(Out.dtype.element_ty), c_mask)
            tl.atomic_xchg(Tickets + seq * tl.num_programs(1) + kvh, 0)
    else:
        o_ptrs = Out + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(o_ptrs + d[None, :], out.to(Out.dtype.element_ty), mask=o_mask)


def default_num_splits(
    num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device
) -> int:
    """Split the contexts only while (sequence, KV head) programs cannot fill the GPU: aiming at
    about PROGRAMS_PER_SM programs per SM, with at least MIN_SPLIT_LEN keys per split of the
    longest context. Each sequence is cut by its own length, so short ones split as finely."""
    want = triton.cdiv(PROGRAMS_PER_SM * sm_count(device), num_seqs * num_kv_heads)
    return max(1, min(want, triton.cdiv(max_context_len, MIN_SPLIT_LEN), MAX_SPLITS))


def supports(
    q: torch.Tensor, max_seqlen_q: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> bool:
    """Whether `paged_attention` takes this call on a GPU: CUDA, fp16/bf16, a decode-like step."""
    group = num_heads // num_kv_heads
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and max_seqlen_q <= MAX_QUERY_LEN
        and max_seqlen_q * group <= MAX_ROWS
        and head_dim <= 256
    )


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen_q: int,
    max_context_len: int,
    scale: float,
    alibi_slopes: torch.Tensor | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    slot_mapping: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    shared: SharedPrefixes | None = None,
    prefix_config: tuple[int, ...] | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of packed queries over the paged cache; returns [T, H, D] in q's dtype.

    q [T, H, D] (the new tokens, sequence after sequence as `cu_seqlens` [B+1] says); kv_cache
    [2, num_blocks, block_size, Hkv, D]; block_tables int [B, max_blocks]; context_lens int [B]
    (keys visible to each sequence, new ones included: its queries sit at the last positions);
    alibi_slopes float [H] or None. With `new_kv` = (k, v) [T, Hkv, D] and `slot_mapping` int [T]
    the kernel first writes the new tokens' keys and values into their cache slots (one kernel
    for the whole layer's decode attention); without, the cache already holds them.
    `max_seqlen_q`/`max_context_len` are host ints (nothing is read back from the device).
    With `shared` (a decode step's groups, on q's device: energon/parallel/shared_prefix.py)
    the prefix each group shares is read once for all its members by a pass launched first,
    and each member's own programs read only its keys past that prefix; `prefix_config`
    (block_n, num_warps[, num_stages]) of that pass (default: 64 keys a tile, 4 warps).
    `block_n`, `num_warps`, `num_stages`: the decode kernel's (default 64 keys a tile of
    head_dim <= 128, 4 warps, Triton's stages; unsplit after a prefix pass SHARED_CONFIG).
    """
    T, H, D = q.shape
    q, keys, values, page, Hkv = cache_operands(q, kv_cache)
    group = H // Hkv
    B = context_lens.shape[0]
    if new_kv is not None:
        k_new, v_new = new_kv
        if slot_mapping is None or k_new.shape != (T, Hkv, D) or v_new.shape != k_new.shape:
            raise ValueError(f"new_kv needs k and v [{T}, {Hkv}, {D}] and a slot_mapping")
        if v_new.stride() != k_new.stride() or k_new.stride(-1) != 1:  # one layout for both
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
    else:
        k_new = v_new = slot_mapping = q  # unused
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    if T == 0:
        return out

    valid_m = triton.next_power_of_2(max_seqlen_q * group)
    block_m = max(16, valid_m)
    block_d = max(16, triton.next_power_of_2(D))
    tile = 64 if block_d <= 128 else 32  # keys a tile by default, for both kernels
    if num_splits is None:
        num_splits = default_num_splits(B, Hkv, max_context_len, q.device)
    if (
        shared is not None
        and num_splits == 1
        and B * Hkv >= SHARED_CONFIG_PROGRAMS_PER_SM * sm_count(q.device)
        and block_d <= 128
    ):  # many programs, each with few keys of its own
        block_n = block_n or SHARED_CONFIG[0]
        num_warps = num_warps or SHARED_CONFIG[1]
        num_stages = num_stages or SHARED_CONFIG[2]
    block_n = block_n or tile
    num_warps = num_warps or 4
    num_splits = max(1, min(num_splits, triton.cdiv(max_context_len, block_n)))
    parts = 0
    if shared is not None:
        if max_seqlen_q != 1:
            raise ValueError(f"shared prefixes need one new token a sequence (got {max_seqlen_q})")
        parts = shared.parts or num_parts(shared.num_groups, shared.max_prefix_len, Hkv, q.device)
    # unsplit, the kernel starts from the prefix partials (a load of each row's parts); else
    # it combines them with its splits'
    fold = (
        parts > 0
        and num_splits == 1
        and valid_m * triton.next_power_of_2(parts) * block_d <= FOLD_ELEMENTS
    )
    split = num_splits > 1 or (parts > 0 and not fold)
    partials = split or fold
    if partials:  # the splits' slices, then the prefix pass's
        out_part = torch.empty(num_splits + parts, T, H, D, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(num_splits + parts, T, H, dtype=torch.float32, device=q.device)
    else:
        out_part = lse_part = out  # unused
    tickets = ticket_counters(q.device, B * Hkv, "paged_attention") if split else out
    slopes = alibi_slopes.to(q.device, torch.float32) if alibi_slopes is not None else None
    if parts:
        pass_n, pass_warps, *pass_stages = prefix_config or (tile, 4)
        prefix_attention(
            q, keys, values, shared, block_tables, context_lens, cu_seqlens, scale * LOG2E,
            slopes, out_part, lse_part, first_part=num_splits, parts=parts, block_n=pass_n,
            num_warps=pass_warps, num_stages=pass_stages[0] if pass_stages else None,
        )  # fmt: skip

    _paged_attn_kernel[(B, Hkv, num_splits)](
        q,
        keys,
        values,
        out,
        out_part,
        lse_part,
        tickets,
        k_new,
        v_new,
        slot_mapping,
        block_tables,
        context_lens,
        cu_seqlens,
        slopes if slopes is not None else out,
        shared.prefix_lens if parts else out,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *cache_strides(keys, values),
        k_new.stride(0),
        k_new.stride(1),
        out.stride(0),
        out.stride(1),
        block_tables.stride(0),
        out_part.stride(0) if partials else 0,
        out_part.stride(1) if partials else 0,
        out_part.stride(2) if partials else 0,
        lse_part.stride(0) if partials else 0,
        lse_part.stride(1) if partials else 0,
        HEAD_DIM=D,
        GROUP=group,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        MAX_Q=max(2, triton.next_power_of_2(max_seqlen_q)),
        USE_ALIBI=alibi_slopes is not None,
        WRITE=new_kv is not None,
        SPLIT=split,
        SPLITS=triton.next_power_of_2(parts if fold else num_splits + parts),
        PREFIX_PARTS=parts,
        FOLD=fold,
        VALID_M=valid_m,
        COMBINE_M=min(
            valid_m,
            max(1, COMBINE_ELEMENTS // (triton.next_power_of_2(num_splits + parts) * block_d)),
        ),
        IEEE=q.dtype == torch.float32,
        num_warps=num_warps,
        **({} if num_stages is None else {"num_stages": num_stages}),
        **chained(q.device),
    )
    return out
