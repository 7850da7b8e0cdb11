"""The Triton paged prefill-attention kernel equals a float64 softmax over the cached keys.

As for the decode kernel (test_paged_attention.py, whose cases and float64 reference these
tests share): without CUDA the kernel runs in Triton's interpreter in one spawned worker
process, with CUDA compiled on the GPU; everything skips where triton is not installed.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_paged_attention import TOL, make_case, needs_cuda, reference

from energon.parallel.attention import Attention, alibi_slopes
from energon.parallel.packing import BatchMeta


def _paged_prefill(kwargs):
    """Runs in the kernel's process: the interpreter worker, or this one on CUDA."""
    from energon.parallel.paged_prefill import paged_prefill

    return paged_prefill(**kwargs)


class Kernels:
    """Calls paged_prefill compiled on CUDA, else interpreted in a worker process."""

    def __init__(self, pool=None):
        self.pool = pool
        self.device = "cpu" if pool else "cuda"

    def __call__(self, q, cache, meta, scale, slopes=None, **kwargs):
        kwargs.update(
            q=q,
            kv_cache=cache,
            block_tables=meta.block_tables,
            context_lens=meta.context_lens,
            cu_seqlens=meta.cu_seqlens,
            max_seqlen_q=meta.max_seqlen_q,
            scale=scale,
            alibi_slopes=None if slopes is None else slopes.to(q.device),
        )
        if self.pool is None:
            return _paged_prefill(kwargs)
        return self.pool.apply(_paged_prefill, (kwargs,))


@pytest.fixture(scope="module")
def prefill(request):
    """Compiled on CUDA, else the Triton-interpreter worker (tests/conftest.py)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return Kernels()
    return Kernels(request.getfixturevalue("triton_interpreter"))


# Prompts after a cached prefix (5 new of 37, 70 of 200), a whole prompt (40 of 40: its keys
# are all new) and a single token (1 of 20) in one call.
QUERY_LENS, CONTEXT_LENS = [5, 40, 1, 70], [37, 40, 20, 200]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
@pytest.mark.parametrize("use_alibi", [False, True], ids=["no-alibi", "alibi"])
def test_prefill_after_cached_tokens_equals_reference(
    prefill, use_alibi, kv_heads, block_size, dtype
):
    q, cache, meta, kv = make_case(
        QUERY_LENS, CONTEXT_LENS, kv_heads=kv_heads, block_size=block_size, dtype=dtype,
        device=prefill.device, seed=block_size + kv_heads,
    )  # fmt: skip
    slopes = alibi_slopes(4) if use_alibi else None
    out = prefill(q, cache, meta, 0.125, slopes)
    assert out.dtype == dtype and out.shape == q.shape
    expected = reference(q, kv, QUERY_LENS, 0.125, slopes)
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize(("block_m", "block_n"), [(16, 16), (16, 64), (64, 16), (32, 32)])
def test_tiles_that_cross_the_causal_diagonal(prefill, block_m, block_n):
    # Query tiles that start mid-page and key tiles that cut the diagonal at every offset; the
    # second sequence's 3 query tiles of 16 end at different key tiles.
    query_lens, context_lens = [7, 45, 33], [100, 61, 33]
    q, cache, meta, kv = make_case(query_lens, context_lens, device=prefill.device, seed=block_m)
    slopes = alibi_slopes(4)
    out = prefill(q, cache, meta, 0.125, slopes, block_m=block_m, block_n=block_n)
    expected = reference(q, kv, query_lens, 0.125, slopes)
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)


def test_odd_head_dim_and_one_sequence(prefill):
    query_lens, context_lens = [24], [90]
    q, cache, meta, kv = make_case(
        query_lens, context_lens, kv_heads=4, head_dim=40, device=prefill.device, seed=3
    )
    out = prefill(q, cache, meta, 40**-0.5, block_m=16)
    expected = reference(q, kv, query_lens, 40**-0.5)
    torch.testing.assert_close(out.cpu().double(), expected.cpu(), atol=1e-5, rtol=0)


# --- compiled on the GPU ----------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("use_alibi", [False, True], ids=["no-alibi", "alibi"])
def test_cuda_kernel_equals_reference(prefill, dtype, use_alibi):
    query_lens, context_lens = [64, 300, 1, 129, 512], [1088, 300, 40, 1000, 2048]
    for block_size, head_dim, kv_heads in [(16, 128, 4), (32, 64, 1), (16, 256, 2)]:
        q, cache, meta, kv = make_case(
            query_lens, context_lens, kv_heads=kv_heads, head_dim=head_dim,
            block_size=block_size, dtype=dtype, device="cuda", seed=block_size + head_dim,
        )  # fmt: skip
        slopes = alibi_slopes(4) if use_alibi else None
        out = prefill(q, cache, meta, head_dim**-0.5, slopes)
        expected = reference(q, kv, query_lens, head_dim**-0.5, slopes)
        torch.testing.assert_close(out.cpu().double(), expected, atol=TOL[dtype], rtol=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("use_alibi", [False, True], ids=["no-alibi", "alibi"])
def test_cuda_attention_after_a_cached_prefix_takes_prefill_kernel(monkeypatch, use_alibi):
    """A step of prompts continuing after cached tokens (and one later decode) goes to the
    prefill kernel, not the grid path, and equals the grid path's output."""
    pytest.importorskip("triton")
    heads, kv_heads, head_dim, block_size = 8, 2, 64, 16
    query_lens, context_lens = [48, 30, 1], [112, 60, 77]
    pool = list(range(24))
    random.Random(1).shuffle(pool)
    tables, at = [], 0
    for n in context_lens:
        tables.append(pool[at : at + -(-n // block_size)])
        at += len(tables[-1])
    slopes = alibi_slopes(heads) if use_alibi else None
    attn = Attention(heads, kv_heads, head_dim, head_dim**-0.5, alibi_slopes=slopes)
    attn.use_flash = False  # a torch whose varlen_attn reads block tables would go there first
    g = torch.Generator().manual_seed(2)
    attn.kv_cache = torch.randn(2, 24, block_size, kv_heads, head_dim, generator=g).cuda().half()
    T = sum(query_lens)
    q = torch.randn(T, heads * head_dim, generator=g).cuda().half()
    k, v = (torch.randn(T, kv_heads * head_dim, generator=g).cuda().half() for _ in "kv")
    meta = BatchMeta.for_step(query_lens, context_lens, tables, block_size, device="cuda")
    assert meta.parts is not None  # prompts then a decode: each part its own way

    attn.use_paged = False
    cache = attn.kv_cache.clone()
    grid = attn(q, k, v, meta)
    attn.use_paged, attn.kv_cache = True, cache
    monkeypatch.setattr(attn, "_varlen", lambda *a: pytest.fail("took the grid path"))
    out = attn(q, k, v, meta)
    torch.testing.assert_close(out, grid, atol=2e-3, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_alibi_prompts_read_their_keys_back_through_the_kernel(monkeypatch):
    """ALiBi keeps flash out: new prompts (alone, then beside a prompt after cached keys) read
    the K/V they just wrote through the prefill kernel, not the grid path's float mask, and
    equal the float64 reference."""
    pytest.importorskip("triton")
    from test_paged_attention import reference

    heads, kv_heads, head_dim, block_size = 8, 8, 64, 16
    slopes = alibi_slopes(heads)
    attn = Attention(heads, kv_heads, head_dim, head_dim**-0.5, alibi_slopes=slopes)
    attn.kv_cache = torch.zeros(2, 40, block_size, kv_heads, head_dim, device="cuda").half()
    monkeypatch.setattr(attn, "_varlen", lambda *a: pytest.fail("took the grid path"))
    g = torch.Generator().manual_seed(4)
    tables = [list(range(0, 10)), list(range(10, 20)), list(range(20, 40))]
    keys = {}  # sequence -> its (k, v) so far, [ctx, Hkv, D]

    def step(query_lens, context_lens, seqs):
        T = sum(query_lens)
        q = torch.randn(T, heads, head_dim, generator=g).half()
        k, v = (torch.randn(T, kv_heads, head_dim, generator=g).half() for _ in "kv")
        start = 0
        for s, n in zip(seqs, query_lens, strict=True):
            old = keys.get(s, (k[:0], v[:0]))
            keys[s] = tuple(
                torch.cat([o, x[start : start + n]]) for o, x in zip(old, (k, v), strict=True)
            )
            start += n
        meta = BatchMeta.for_step(
            query_lens, context_lens, [tables[s] for s in seqs], block_size, device="cuda"
        )
        out = attn(q.cuda().flatten(1), k.cuda().flatten(1), v.cuda().flatten(1), meta)
        want = reference(q, [keys[s] for s in seqs], query_lens, head_dim**-0.5, slopes)
        torch.testing.assert_close(
            out.view(T, heads, head_dim).cpu().double(), want, atol=5e-3, rtol=0
        )

    step([100, 37], [100, 37], [0, 1])  # fresh prompts only
    step([30, 50], [130, 50], [0, 2])  # a prompt after cached keys beside a fresh one


def test_cache_operands_refuse_what_does_not_fit():
    pytest.importorskip("triton")
    from energon.parallel.key_tile import cache_operands

    cache = torch.zeros(2, 3, 4, 2, 8)  # [2, blocks, block_size, Hkv, D]
    q, keys, values, page, kv_heads = cache_operands(torch.zeros(5, 8, 4).transpose(1, 2), cache)
    assert q.stride(-1) == 1 and q.shape == (5, 4, 8) and (page, kv_heads) == (4, 2)
    assert keys.data_ptr() == cache.data_ptr() and values.data_ptr() == cache[1].data_ptr()
    with pytest.raises(ValueError, match="does not fit"):
        cache_operands(torch.zeros(5, 4, 16), cache)  # another head_dim
    with pytest.raises(ValueError, match="does not fit"):
        cache_operands(torch.zeros(5, 3, 8), cache)  # 3 heads over 2 KV heads
    with pytest.raises(ValueError, match="contiguous"):
        cache_operands(torch.zeros(5, 4, 8), torch.zeros(2, 3, 4, 8, 2).transpose(-1, -2))


def test_new_prompts_that_flash_cannot_take_read_their_keys_back(monkeypatch):
    """The path choice, on cpu (where the kernel's own choice says no): with the prefill kernel
    usable, ALiBi prompts whose K/V forward just wrote, alone or as the fresh part of a mixed
    step, read them back from the cache (here through the grid path over the cache, standing in
    for the kernel) and equal attending to the new tokens; without a cache they do not."""
    heads, head_dim, block_size = 4, 16, 4
    slopes = alibi_slopes(heads)
    g = torch.Generator().manual_seed(9)
    tables = [[0, 1, 2], [3, 4, 5, 6, 7]]

    def layer(cache: bool) -> Attention:
        attn = Attention(heads, heads, head_dim, head_dim**-0.5, alibi_slopes=slopes)
        attn.kv_cache = torch.zeros(2, 8, block_size, heads, head_dim) if cache else None
        return attn

    cases = (
        ([10, 17], [10, 17], [[10, 17]]),  # new prompts only
        ([10, 3], [10, 17], [[10], [17]]),  # a new prompt, then 3 tokens after 14 cached
    )
    for query_lens, context_lens, reads in cases:
        T = sum(query_lens)
        q, k, v = (torch.randn(T, heads * head_dim, generator=g) for _ in "qkv")
        meta = BatchMeta.for_step(query_lens, context_lens, tables, block_size)
        plain = layer(cache=True)
        plain.kv_cache[:] = torch.randn(plain.kv_cache.shape, generator=g)  # the cached keys
        want = plain(q, k, v, meta)  # fresh prompts attend to their new tokens directly
        reader = layer(cache=True)
        reader.kv_cache[:] = plain.kv_cache
        read_back = []

        def kernel(q3, part, attn=reader, read_back=read_back):
            read_back.append(part.context_lens.tolist())
            return attn._varlen(q3, None, None, part, True)  # reads the keys from the cache

        monkeypatch.setattr(reader, "_takes_paged_prefill", lambda q3: True)
        monkeypatch.setattr(reader, "_paged_prefill", kernel)
        torch.testing.assert_close(reader(q, k, v, meta), want, atol=1e-5, rtol=0)
        assert read_back == reads  # the new prompts read back too
    no_cache = layer(cache=False)
    monkeypatch.setattr(no_cache, "_takes_paged_prefill", lambda q3: True)
    monkeypatch.setattr(no_cache, "_paged_prefill", lambda *a: pytest.fail("no cache to read"))
    no_cache(q, k, v, BatchMeta.for_prefill([10, 3]))
