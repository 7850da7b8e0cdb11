"""The Triton cache write puts each token's K and V row exactly where its slot says.

Reference: a Python loop that assigns every (token, KV head) row at its (block, offset), on a
copy of the same cache; the kernel's cache must equal it bit for bit, every other slot left as
it was. Without CUDA the kernel runs in Triton's interpreter in one spawned worker process
(tests/conftest.py), with CUDA compiled on the GPU; everything skips without triton.
"""

from __future__ import annotations

import pytest
import torch

from energon.parallel.attention import Attention


def _write(cache, k, v, slots):
    """Runs in the kernel's process: the interpreter worker, or this one on CUDA."""
    from energon.parallel.cache_write import write_kv

    write_kv(cache, k, v, slots)
    return cache


@pytest.fixture(scope="module")
def write(request):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda", _write
    pool = request.getfixturevalue("triton_interpreter")
    return "cpu", lambda *args: pool.apply(_write, args)


def _reference(cache, k, v, slots):
    out = cache.clone()
    page = cache.shape[2]
    for t, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        for h in range(k.shape[1]):
            out[0, slot // page, slot % page, h] = k[t, h].to(cache.dtype)
            out[1, slot // page, slot % page, h] = v[t, h].to(cache.dtype)
    return out


def _qkv(tokens, heads, kv_heads, dim, dtype, device):
    """k, v as the merged q/k/v projection leaves them: strided views of one [T, (H+2Hkv)D]."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, device=device)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    return k, v


@pytest.mark.parametrize(
    "kv_heads, dim, page, src, dst",
    [
        (2, 16, 4, torch.float16, torch.float16),
        (3, 80, 16, torch.bfloat16, torch.bfloat16),  # a head_dim and width past no power of 2
        (4, 64, 8, torch.float32, torch.float16),  # cast to the cache's dtype
        (16, 128, 16, torch.float16, torch.float16),  # rows wider than one column tile
    ],
)
def test_rows_land_in_their_slots(write, kv_heads, dim, page, src, dst):
    device, run = write
    gen = torch.Generator().manual_seed(kv_heads * dim + page)
    blocks, tokens = 7, 19
    cache = torch.randn(2, blocks, page, kv_heads, dim, generator=gen).to(dst).to(device)
    k, v = _qkv(tokens, 2 * kv_heads, kv_heads, dim, src, device)
    slots = torch.randperm(blocks * page, generator=gen)[:tokens]
    slots[[3, 11]] = -1  # no write for these tokens
    slots = slots.to(device)
    got = run(cache.clone(), k, v, slots)
    want = _reference(cache, k, v, slots)
    assert torch.equal(got.cpu(), want.cpu())
    assert not torch.equal(got.cpu(), cache.cpu())  # something was written


def test_mismatched_shapes_are_refused():
    pytest.importorskip("triton")
    from energon.parallel.cache_write import write_kv

    cache = torch.zeros(2, 3, 4, 2, 8)
    k = torch.zeros(5, 2, 8)
    with pytest.raises(ValueError, match="do not fit kv_cache"):
        write_kv(cache, k, torch.zeros(5, 2, 4), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="do not fit kv_cache"):
        write_kv(cache, k, k, torch.zeros(4, dtype=torch.int64))


def test_layouts_the_kernel_cannot_take_are_refused():
    """A v (or k, or cache) whose head_dim is strided, or slots that are not one after another,
    are not the kernel's: `supports` says no (Attention then uses index_copy_), write_kv raises."""
    pytest.importorskip("triton")
    from energon.parallel.cache_write import supports, write_kv

    cache = torch.zeros(2, 3, 4, 2, 8)
    k, v = torch.zeros(5, 2, 8), torch.zeros(5, 2, 8)
    slots = torch.arange(5)
    assert supports(k, v, cache, slots)
    strided_v = torch.zeros(5, 2, 16)[:, :, ::2]
    sparse_slots = torch.arange(10)[::2]
    for args in (
        (k, strided_v, cache, slots),
        (strided_v, v, cache, slots),
        (k, v, torch.zeros(2, 3, 4, 2, 16)[..., ::2], slots),
        (k, v, cache, sparse_slots),
    ):
        assert not supports(*args)
        with pytest.raises(ValueError, match="contiguous head_dims"):
            write_kv(args[2], args[0], args[1], args[3])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_writes_through_the_kernel_as_index_copy_did():
    """`Attention` on CUDA writes a prefill's K/V with the kernel; the cache equals the one
    the index_copy_ path (the CPU path) fills from the same rows."""
    pytest.importorskip("triton")
    heads, kv_heads, dim, page = 8, 4, 64, 16
    attn = Attention(heads, kv_heads, dim, dim**-0.5)
    k, v = _qkv(40, heads, kv_heads, dim, torch.float16, "cuda")
    slots = torch.randperm(6 * page, device="cuda")[:40]
    attn.kv_cache = torch.zeros(2, 6, page, kv_heads, dim, dtype=torch.float16, device="cuda")
    attn._write_cache(k, v, slots)
    on_cpu = Attention(heads, kv_heads, dim, dim**-0.5)
    on_cpu.kv_cache = torch.zeros(2, 6, page, kv_heads, dim, dtype=torch.float16)
    on_cpu._write_cache(k.cpu(), v.cpu(), slots.cpu())
    assert torch.equal(attn.kv_cache.cpu(), on_cpu.kv_cache)
