"""The Triton paged decode-attention kernel equals a float64 softmax over the cached keys.

Without CUDA the kernels run in Triton's interpreter on CPU tensors. The interpreter must be
chosen before triton is first imported, and torch imports triton early, so the interpreted calls
go to one spawned worker process that starts with TRITON_INTERPRET=1: the variable never reaches
this test process or any other test. With CUDA the same cases run the compiled kernels on the
GPU. Everything skips where triton is not installed.
"""

from __future__ import annotations

import random

import pytest
import torch

from energon.parallel.attention import Attention, alibi_slopes
from energon.parallel.packing import BatchMeta

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _paged_attention(kwargs):
    """Runs in the kernels' process: the interpreter worker, or this one on CUDA."""
    from energon.parallel.paged_attention import paged_attention

    return paged_attention(**kwargs)


def _paged_attention_and_cache(kwargs):
    """As _paged_attention, also returning the cache (which a writing call changes)."""
    return _paged_attention(kwargs), kwargs["kv_cache"]


def _forward_paged(args):
    """Attention.forward in the kernels' process; off CUDA the paged decode kernel
    (interpreted) takes what it takes on CUDA: the decode-like calls over the cache."""
    from energon.parallel import attention
    from energon.parallel.paged_attention import MAX_QUERY_LEN

    attn, q, k, v, meta = args
    saved = attention.paged_usable
    if not q.is_cuda:
        attention.paged_usable = lambda q, meta, heads, kv_heads: (
            meta.block_tables is not None and meta.max_seqlen_q <= MAX_QUERY_LEN
        )
    try:
        return attn(q, k, v, meta), attn.kv_cache
    finally:
        attention.paged_usable = saved


class Kernels:
    """Calls paged_attention compiled on CUDA, else interpreted in a worker process."""

    def __init__(self, pool=None):
        self.pool = pool
        self.device = "cpu" if pool else "cuda"

    def paged_attention(self, **kwargs):
        if self.pool is None:
            return _paged_attention(kwargs)
        return self.pool.apply(_paged_attention, (kwargs,))

    def paged_attention_and_cache(self, **kwargs):
        if self.pool is None:
            return _paged_attention_and_cache(kwargs)
        return self.pool.apply(_paged_attention_and_cache, (kwargs,))

    def forward_paged(self, attn, q, k, v, meta):
        """(Attention.forward's output, the cache after it) with the paged kernels."""
        if self.pool is None:
            return _forward_paged((attn, q, k, v, meta))
        return self.pool.apply(_forward_paged, ((attn, q, k, v, meta),))


@pytest.fixture(scope="module")
def kernels(request):
    """Compiled on CUDA, else the Triton-interpreter worker (tests/conftest.py)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return Kernels()
    return Kernels(request.getfixturevalue("triton_interpreter"))


def make_case(
    query_lens,
    context_lens,
    heads=4,
    kv_heads=2,
    head_dim=64,
    block_size=16,
    dtype=torch.float32,
    device="cpu",
    seed=0,
):
    """Random q and a cache whose blocks are scattered over the pool (a shuffled block list);
    returns (q [T, H, D], kv_cache, meta, per-sequence (k, v) [ctx, Hkv, D])."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    need = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(need) + 3  # a few blocks nobody owns
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, at = [], 0
    for n in need:
        tables.append(pool[at : at + n])
        at += n
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g)
    meta = BatchMeta.for_step(query_lens, context_lens, tables, block_size, device=device)
    cache, q = cache.to(device, dtype), q.to(device, dtype)
    flat = cache.flatten(1, 2).cpu()
    kv = []
    for table, c in zip(tables, context_lens, strict=True):
        slots = torch.tensor(
            [table[j // block_size] * block_size + j % block_size for j in range(c)]
        )
        kv.append((flat[0][slots], flat[1][slots]))
    return q, cache, meta, kv


def reference(q, kv, query_lens, scale, slopes=None):
    """float64: each sequence's queries sit at its last positions and see keys 0..position."""
    out, start = [], 0
    for (k, v), n in zip(kv, query_lens, strict=True):
        qs = q[start : start + n].cpu().double()  # [n, H, D]
        start += n
        group = qs.shape[1] // k.shape[1]
        k = k.double().repeat_interleave(group, 1)
        v = v.double().repeat_interleave(group, 1)
        ctx = k.shape[0]
        q_pos = torch.arange(ctx - n, ctx)[:, None]
        k_pos = torch.arange(ctx)[None, :]
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        if slopes is not None:
            scores = scores + slopes.double()[:, None, None] * (k_pos - q_pos)
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
    return torch.cat(out)


def run_kernel(kernels, q, cache, meta, scale, slopes=None, **kwargs):
    if slopes is not None:
        slopes = slopes.to(q.device)
    return kernels.paged_attention(
        q=q,
        kv_cache=cache,
        block_tables=meta.block_tables,
        context_lens=meta.context_lens,
        cu_seqlens=meta.cu_seqlens,
        max_seqlen_q=meta.max_seqlen_q,
        max_context_len=kwargs.pop("max_context_len", meta.max_context_len),
        scale=scale,
        alibi_slopes=slopes,
        **kwargs,
    )


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_heads", [2, 1, 4], ids=["gqa2", "mqa", "mha"])
@pytest.mark.parametrize("use_alibi", [False, True], ids=["no-alibi", "alibi"])
def test_decode_equals_reference(kernels, use_alibi, kv_heads, block_size, head_dim, dtype):
    query_lens, context_lens = [1, 1, 1, 1], [1, 37, 70, 16]
    q, cache, meta, kv = make_case(
        query_lens, context_lens, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
        dtype=dtype, device=kernels.device, seed=block_size + head_dim + kv_heads,
    )  # fmt: skip
    slopes = alibi_slopes(4) if use_alibi else None
    scale = head_dim**-0.5
    out = run_kernel(kernels, q, cache, meta, scale, slopes)
    assert out.dtype == dtype and out.shape == q.shape
    expected = reference(q, kv, query_lens, scale, slopes)
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("num_splits", [2, 3, 5])
@pytest.mark.parametrize("use_alibi", [False, True], ids=["no-alibi", "alibi"])
def test_split_context_equals_reference(kernels, num_splits, use_alibi):
    # 5 splits of a 150-key context leave the short sequences' later splits empty
    query_lens, context_lens = [1, 1, 1], [150, 3, 64]
    q, cache, meta, kv = make_case(query_lens, context_lens, device=kernels.device, seed=num_splits)
    slopes = alibi_slopes(4) if use_alibi else None
    out = run_kernel(kernels, q, cache, meta, 0.125, slopes, num_splits=num_splits, block_n=16)
    expected = reference(q, kv, query_lens, 0.125, slopes)
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_splits", [None, 16])
def test_splits_follow_each_sequences_own_context(kernels, num_splits):
    # As a decode CUDA graph calls it: max_context_len is the longest context the graph serves,
    # far past these; each sequence cuts its own context (16 splits of 3 keys: most are empty)
    query_lens, context_lens = [1, 1, 2], [100, 3, 33]
    q, cache, meta, kv = make_case(query_lens, context_lens, device=kernels.device, seed=11)
    slopes = alibi_slopes(4)
    out = run_kernel(
        kernels, q, cache, meta, 0.125, slopes, num_splits=num_splits, block_n=16,
        max_context_len=2048,
    )  # fmt: skip
    expected = reference(q, kv, query_lens, 0.125, slopes)
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_new_keys_and_values_are_written_then_attended(kernels, num_splits):
    # The cache slots of the new tokens hold garbage; the kernel writes k/v (strided views of
    # one q/k/v-like buffer, as the merged GEMM leaves them) there and attends to them. With 2
    # splits of sequence 1 (context 40, cut into 32 + 8 keys) its 3 new tokens straddle the cut.
    query_lens, context_lens = [1, 3, 2], [20, 40, 2]
    q, cache, meta, kv = make_case(query_lens, context_lens, device=kernels.device, seed=5)
    expected = reference(q, kv, query_lens, 0.125, None)
    new = torch.empty(q.shape[0], 3, 2, 64, dtype=cache.dtype, device=cache.device)
    flat = cache.flatten(1, 2)  # [2, slots, Hkv, D]
    new[:, 1] = flat[0, meta.slot_mapping]
    new[:, 2] = flat[1, meta.slot_mapping]
    want_cache = cache.clone()
    flat[:, meta.slot_mapping] = 1e3  # garbage where the new tokens go
    out, cache = kernels.paged_attention_and_cache(
        q=q, kv_cache=cache, block_tables=meta.block_tables, context_lens=meta.context_lens,
        cu_seqlens=meta.cu_seqlens, max_seqlen_q=meta.max_seqlen_q,
        max_context_len=meta.max_context_len, scale=0.125, new_kv=(new[:, 1], new[:, 2]),
        slot_mapping=meta.slot_mapping, num_splits=num_splits, block_n=16,
    )  # fmt: skip
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)
    assert torch.equal(cache.cpu(), want_cache.cpu())


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_few_new_tokens_per_sequence_stay_causal(kernels, num_splits):
    # 16 splits of 16-key tiles: the combine takes the 8 query rows (2 heads x up to 3 tokens,
    # padded) 4 at a time
    query_lens, context_lens = [1, 3, 2], [20, 300, 2]
    q, cache, meta, kv = make_case(query_lens, context_lens, device=kernels.device, seed=7)
    slopes = alibi_slopes(4)
    out = run_kernel(kernels, q, cache, meta, 0.125, slopes, num_splits=num_splits, block_n=16)
    expected = reference(q, kv, query_lens, 0.125, slopes)
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)


def test_multi_head_and_odd_head_dim(kernels):
    query_lens, context_lens = [1, 1], [33, 9]
    q, cache, meta, kv = make_case(
        query_lens, context_lens, kv_heads=4, head_dim=40, device=kernels.device, seed=8
    )
    out = run_kernel(kernels, q, cache, meta, 40**-0.5)
    expected = reference(q, kv, query_lens, 40**-0.5)
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)


def make_shared_case(prefixes, own_lens, block_size=16, heads=4, kv_heads=2, head_dim=64, seed=0,
                     device="cpu", dtype=torch.float32):  # fmt: skip
    """A decode step whose sequences continue cached prefixes: `prefixes` blocks per prefix,
    `own_lens` [(prefix index or None, tokens after it)]; returns (q, cache, meta, kv, shared)
    with the step's groups found from the tables (energon/parallel/shared_prefix.py)."""
    from energon.parallel.shared_prefix import find_shared_prefixes

    g = torch.Generator().manual_seed(seed)
    pool = list(range(sum(prefixes) + sum(-(-n // block_size) for _, n in own_lens) + 2))
    random.Random(seed).shuffle(pool)
    shared_blocks = []
    for n in prefixes:
        shared_blocks.append(pool[:n])
        pool = pool[n:]
    tables, context_lens = [], []
    for prefix, n in own_lens:
        head = shared_blocks[prefix] if prefix is not None else []
        own = -(-n // block_size)
        tables.append(head + pool[:own])
        pool = pool[own:]
        context_lens.append(len(head) * block_size + n)
    num_blocks = max(b for t in tables for b in t) + 1
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    q = torch.randn(len(own_lens), heads, head_dim, generator=g)
    query_lens = [1] * len(own_lens)
    meta = BatchMeta.for_step(query_lens, context_lens, tables, block_size, device=device)
    flat = cache.to(dtype).flatten(1, 2)
    kv = []
    for table, c in zip(tables, context_lens, strict=True):
        slots = torch.tensor(
            [table[j // block_size] * block_size + j % block_size for j in range(c)]
        )
        kv.append((flat[0][slots], flat[1][slots]))
    shared = find_shared_prefixes(query_lens, context_lens, tables, block_size, min_prefix=16)
    return q.to(device, dtype), cache.to(device, dtype), meta, kv, shared.to(device)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("kv_heads", [2, 1, 4], ids=["gqa2", "mqa", "mha"])
@pytest.mark.parametrize("use_alibi", [False, True], ids=["no-alibi", "alibi"])
def test_shared_prefixes_read_once_equal_reference(kernels, use_alibi, kv_heads, num_splits):
    # Two prefixes (5 blocks, 3 blocks), six sequences after the first (one ends right at a
    # block's end), two after the second, one alone; block_n 16 cuts the 80-key prefix in parts
    own = [(0, 1), (0, 17), (0, 40), (1, 5), (0, 16), (None, 30), (1, 33), (0, 2), (0, 3)]
    q, cache, meta, kv, shared = make_shared_case(
        [5, 3], own, kv_heads=kv_heads, device=kernels.device, seed=kv_heads + num_splits
    )
    assert shared.num_groups == 2 and int(shared.prefix_lens[5]) == 0
    slopes = alibi_slopes(4) if use_alibi else None
    expected = reference(q, kv, [1] * len(own), 0.125, slopes)
    out = run_kernel(
        kernels, q, cache, meta, 0.125, slopes, shared=shared, num_splits=num_splits, block_n=16
    )
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)


def test_shared_prefix_members_past_one_tile_of_rows(kernels):
    # 40 sequences after one prefix with 4 query heads each (MHA-like, group 1 of 4 KV heads
    # would be 40 rows; GQA 4:1 makes 160 rows): the pass takes them a tile of rows at a time
    own = [(0, 1 + i % 7) for i in range(40)]
    q, cache, meta, kv, shared = make_shared_case([2], own, kv_heads=1, device=kernels.device)
    expected = reference(q, kv, [1] * len(own), 0.125)
    out = run_kernel(kernels, q, cache, meta, 0.125, shared=shared, block_n=16)
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa2", "mha"])
def test_shared_prefix_with_new_keys_written_by_the_kernel(kernels, kv_heads):
    # As Attention calls it: the new tokens' k/v are written by the decode kernel, after the
    # prefix pass has read the (sealed) prefix blocks (unsplit: the kernel starts from the
    # prefix pass's partials instead of combining them after)
    own = [(0, 3), (0, 20), (None, 9)]
    q, cache, meta, kv, shared = make_shared_case(
        [4], own, kv_heads=kv_heads, device=kernels.device, seed=2
    )
    expected = reference(q, kv, [1] * 3, 0.125)
    flat = cache.flatten(1, 2)
    new = flat[:, meta.slot_mapping].clone()
    want_cache = cache.clone()
    flat[:, meta.slot_mapping] = 1e3
    out, cache = kernels.paged_attention_and_cache(
        q=q, kv_cache=cache, block_tables=meta.block_tables, context_lens=meta.context_lens,
        cu_seqlens=meta.cu_seqlens, max_seqlen_q=1, max_context_len=meta.max_context_len,
        scale=0.125, new_kv=(new[0], new[1]), slot_mapping=meta.slot_mapping, shared=shared,
        block_n=16, num_splits=1,
    )  # fmt: skip
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)
    assert torch.equal(cache.cpu(), want_cache.cpu())


def test_mixed_step_reads_each_run_of_decodes_prefix_once(kernels):
    # As the runner runs a step of decodes beside prompts: two runs of decodes (after a 96-key
    # prefix, then after an 80-key one), a prompt chunk after the first prefix and a fresh
    # prompt between them; each run of decodes gets its own groups (share_in_parts) and
    # Attention.forward runs the parts, the decodes through the paged kernel with the groups.
    # (Groups found from the wrong run would claim 96 shared keys for the second run's pair.)
    from energon.parallel.shared_prefix import share_in_parts

    bs, heads, kv_heads, dim = 16, 4, 2, 32
    g = torch.Generator().manual_seed(3)
    first, second = list(range(6)), list(range(6, 11))
    own = [[11], [12, 13], [14], None, [16, 19, 20], [17, 18]]
    tables = [(first if i < 3 else second) + b if b else [15] for i, b in enumerate(own)]
    query_lens = [1, 1, 5, 6, 1, 1]
    context_lens = [106, 116, 101, 6, 120, 110]
    device = kernels.device
    meta = BatchMeta.for_step(query_lens, context_lens, tables, bs, device=device)
    assert share_in_parts(meta, query_lens, context_lens, tables, bs)
    assert [int(p.shared.max_prefix_len) for _, p, _ in meta.parts if p.shared] == [96, 80]
    cache = torch.randn(2, 21, bs, kv_heads, dim, generator=g).to(device)
    flat = cache.flatten(1, 2)
    q = torch.randn(sum(query_lens), heads * dim, generator=g).to(device)
    k, v = (x.flatten(1) for x in flat[:, meta.slot_mapping])  # what the cache holds there
    kv = []
    for table, c in zip(tables, context_lens, strict=True):
        slots = [table[j // bs] * bs + j % bs for j in range(c)]
        kv.append((flat[0][slots].cpu(), flat[1][slots].cpu()))
    expected = reference(q.view(-1, heads, dim), kv, query_lens, dim**-0.5)
    attn = Attention(heads, kv_heads, dim, dim**-0.5)
    attn.kv_cache = cache
    out, _ = kernels.forward_paged(attn, q, k, v, meta)
    torch.testing.assert_close(out.view(-1, heads, dim).cpu().double(), expected, atol=1e-5, rtol=0)


def test_reference_matches_attention_tests_loop_reference():
    """This file's vectorised reference equals test_attention's per-score loop."""
    from test_attention import reference as loop_reference

    query_lens, context_lens = [1, 2], [5, 7]
    q, _, _, kv = make_case(query_lens, context_lens, head_dim=8, dtype=torch.float64)
    slopes = alibi_slopes(4)
    ours = reference(q, kv, query_lens, 8**-0.5, slopes)
    theirs = torch.cat(
        [
            loop_reference(q[0:1], *kv[0], slopes),
            loop_reference(q[1:3], *kv[1], slopes),
        ]
    )
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)


def test_split_heuristic_fills_small_batches_only():
    pytest.importorskip("triton")
    from energon.parallel.paged_attention import MAX_SPLITS, default_num_splits

    cpu = torch.device("cpu")  # 132 SMs assumed off CUDA: aiming at 2 x 132 programs
    assert default_num_splits(64, 40, 2048, cpu) == 1
    assert default_num_splits(4, 40, 2048, cpu) == 2
    assert default_num_splits(1, 40, 2048, cpu) == 7
    assert default_num_splits(1, 40, 300, cpu) == 5  # at least MIN_SPLIT_LEN keys each
    assert default_num_splits(1, 1, 100_000, cpu) == MAX_SPLITS


# --- compiled kernels on the GPU --------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("use_alibi", [False, True], ids=["no-alibi", "alibi"])
def test_cuda_kernel_equals_reference(kernels, dtype, use_alibi):
    query_lens, context_lens = [1, 1, 2, 1], [1, 300, 129, 1000]
    for block_size, head_dim, kv_heads in [(16, 128, 2), (32, 64, 1)]:
        q, cache, meta, kv = make_case(
            query_lens, context_lens, kv_heads=kv_heads, head_dim=head_dim,
            block_size=block_size, dtype=dtype, device="cuda", seed=block_size,
        )  # fmt: skip
        slopes = alibi_slopes(4) if use_alibi else None
        expected = reference(q, kv, query_lens, head_dim**-0.5, slopes)
        for num_splits in (None, 1):  # None: the default, 4 splits here (few programs)
            out = run_kernel(kernels, q, cache, meta, head_dim**-0.5, slopes, num_splits=num_splits)
            torch.testing.assert_close(out.cpu().double(), expected, atol=TOL[dtype], rtol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("use_alibi", [False, True], ids=["no-alibi", "alibi"])
def test_cuda_attention_decode_takes_paged_kernel(kernels, monkeypatch, use_alibi):
    """Prefill through the grid path, then decode through the kernel: both equal the reference,
    the decode step never reaches the grid path and its kernel writes the new k/v itself."""
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 16
    lengths = [40, 7, 130]
    g = torch.Generator().manual_seed(3)
    seqs = [
        [torch.randn(n, h, head_dim, generator=g) for h in (heads, kv_heads, kv_heads)]
        for n in lengths
    ]
    slopes = alibi_slopes(heads) if use_alibi else None
    attn = Attention(heads, kv_heads, head_dim, head_dim**-0.5, alibi_slopes=slopes)
    attn.use_flash = False  # a torch whose varlen_attn reads block tables would go there first
    attn.kv_cache = torch.zeros(2, 32, block_size, kv_heads, head_dim, device="cuda").half()
    pool = list(range(32))
    random.Random(0).shuffle(pool)
    tables, at = [], 0
    for n in lengths:
        tables.append(pool[at : at + -(-n // block_size)])
        at += len(tables[-1])

    def packed(lo, hi):
        return [torch.cat([s[i][lo:hi].flatten(1) for s in seqs]).cuda().half() for i in range(3)]

    prompt = [n - 1 for n in lengths]
    meta = BatchMeta.for_step(prompt, prompt, tables, block_size, device="cuda")
    attn(*packed(0, -1), meta)  # prefill: not decode-like, the grid path
    monkeypatch.setattr(attn, "_varlen", lambda *a: pytest.fail("decode took the grid path"))
    monkeypatch.setattr(attn, "_write_cache", lambda *a: pytest.fail("a separate cache write"))
    meta = BatchMeta.for_step([1] * 3, lengths, tables, block_size, device="cuda")
    new = packed(-1, None)
    out = attn(*new, meta).view(3, heads, head_dim)
    slots = attn.kv_cache.flatten(1, 2)[:, meta.slot_mapping]  # the kernel wrote the new k/v
    torch.testing.assert_close(slots[0], new[1].view(3, kv_heads, head_dim), atol=0, rtol=0)
    torch.testing.assert_close(slots[1], new[2].view(3, kv_heads, head_dim), atol=0, rtol=0)
    kv = [(s[1].half(), s[2].half()) for s in seqs]
    q = torch.stack([s[0][-1].half() for s in seqs])
    expected = reference(q, kv, [1, 1, 1], head_dim**-0.5, slopes)
    torch.testing.assert_close(out.cpu().double(), expected, atol=5e-3, rtol=0)
