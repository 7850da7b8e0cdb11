"""Attention over packed sequences equals an explicit per-sequence float64 softmax."""

import dataclasses
import math

import pytest
import torch

from energon.parallel.attention import Attention, alibi_slopes
from energon.parallel.packing import BatchMeta

H, HKV, D = 4, 2, 8


def reference(q, k, v, slopes=None):
    """One sequence: q [Lq, H, D] at the last Lq positions of k/v [Lk, Hkv, D]; float64 loops."""
    q, k, v = q.double(), k.double(), v.double()
    lq, lk = q.shape[0], k.shape[0]
    out = torch.zeros_like(q)
    for h in range(q.shape[1]):
        kh = h // (q.shape[1] // k.shape[1])
        for i in range(lq):
            pos = lk - lq + i
            scores = torch.tensor(
                [
                    (q[i, h] @ k[j, kh]).item() / math.sqrt(D)
                    + (0.0 if slopes is None else slopes[h].item() * (j - pos))
                    for j in range(pos + 1)
                ],
                dtype=torch.float64,
            )
            out[i, h] = torch.softmax(scores, 0) @ v[: pos + 1, kh]
    return out


def random_seqs(lengths, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, H, D, generator=g, dtype=dtype),
            torch.randn(n, HKV, D, generator=g, dtype=dtype),
            torch.randn(n, HKV, D, generator=g, dtype=dtype),
        )
        for n in lengths
    ]


def packed(seqs, lo=0, hi=None):
    """Concatenate rows lo:hi of each sequence's q, k, v into packed [T, heads*D] tensors."""
    return [torch.cat([s[i][lo:hi].flatten(1) for s in seqs]) for i in range(3)]


def assert_matches_reference(out, seqs, lo=0, slopes=None, atol=1e-10):
    start = 0
    for q, k, v in seqs:
        n = q.shape[0] - lo
        expected = reference(q[lo:], k, v, slopes).flatten(1)
        torch.testing.assert_close(out[start : start + n].double(), expected, atol=atol, rtol=0)
        start += n


@pytest.mark.parametrize("use_alibi", [False, True], ids=["rope-style", "alibi"])
def test_packed_prefill_equals_per_sequence_softmax(use_alibi):
    lengths = [3, 1, 6]
    seqs = random_seqs(lengths)
    slopes = alibi_slopes(H) if use_alibi else None
    attn = Attention(H, HKV, D, D**-0.5, alibi_slopes=slopes)
    out = attn(*packed(seqs), BatchMeta.for_prefill(lengths))
    assert_matches_reference(out, seqs, slopes=slopes)


def test_padded_baseline_equals_reference_on_real_tokens():
    lengths = [3, 5]
    seqs = random_seqs(lengths, seed=1)
    width = max(lengths)
    padded = [
        tuple(torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])]) for x in s)
        for s in seqs
    ]
    attn = Attention(H, HKV, D, D**-0.5)
    out = attn(*packed(padded), BatchMeta.for_padded(len(lengths), width))
    real = torch.cat([out[b * width : b * width + n] for b, n in enumerate(lengths)])
    assert_matches_reference(real, seqs)


def paged_attention(block_size=4, num_blocks=16):
    attn = Attention(H, HKV, D, D**-0.5)
    attn.kv_cache = torch.zeros(2, num_blocks, block_size, HKV, D, dtype=torch.float64)
    return attn


def test_prefill_then_decode_through_paged_cache_equals_reference():
    lengths = [5, 2, 9]
    seqs = random_seqs(lengths, seed=2)
    tables = [[7, 3], [0], [15, 1, 9]]  # deliberately scattered blocks
    attn = paged_attention()
    prompt = [n - 1 for n in lengths]
    meta = BatchMeta.for_step(prompt, prompt, tables, block_size=4)
    out = attn(*packed(seqs, 0, -1), meta)
    assert_matches_reference(out, [tuple(x[:-1] for x in s) for s in seqs])
    meta = BatchMeta.for_step([1, 1, 1], lengths, tables, block_size=4)
    out = attn(*packed(seqs, -1), meta)
    start = 0
    for q, k, v in seqs:
        expected = reference(q[-1:], k, v).flatten(1)
        torch.testing.assert_close(out[start : start + 1], expected, atol=1e-10, rtol=0)
        start += 1


def test_a_step_is_fresh_only_when_no_sequence_has_cached_tokens():
    assert BatchMeta.for_prefill([3, 1]).fresh
    assert BatchMeta.for_step([3, 2], [3, 2], [[0], [1]], block_size=4).fresh
    assert not BatchMeta.for_step([3, 1], [3, 2], [[0], [1]], block_size=4).fresh
    assert not BatchMeta.for_step([1], [5], [[0, 1]], block_size=4).fresh


def test_chunked_prefill_sees_cached_prefix():
    seqs = random_seqs([7], seed=3)
    attn = paged_attention(block_size=2)
    tables = [[5, 2, 8, 0]]
    attn(*packed(seqs, 0, 3), BatchMeta.for_step([3], [3], tables, block_size=2))
    out = attn(*packed(seqs, 3), BatchMeta.for_step([4], [7], tables, block_size=2))
    q, k, v = seqs[0]
    torch.testing.assert_close(out, reference(q[3:], k, v).flatten(1), atol=1e-10, rtol=0)


def test_mixed_step_of_decodes_then_fresh_prompts_attends_each_part_its_own_way():
    """Continuous batching: two sequences decode while two new prompts start in the same step.
    The fresh prompts (a suffix of the step) attend to their own new tokens, the decodes read
    the cache; every row equals the float64 reference."""
    old = random_seqs([5, 3], seed=5)
    new = random_seqs([4, 2], seed=6)
    tables = [[7, 3], [0], [12, 9], [4]]
    attn = paged_attention()
    attn(*packed(old, 0, -1), BatchMeta.for_step([4, 2], [4, 2], tables[:2], block_size=4))
    q = torch.cat([old[0][0][-1:], old[1][0][-1:], new[0][0], new[1][0]]).flatten(1)
    k = torch.cat([old[0][1][-1:], old[1][1][-1:], new[0][1], new[1][1]]).flatten(1)
    v = torch.cat([old[0][2][-1:], old[1][2][-1:], new[0][2], new[1][2]]).flatten(1)
    meta = BatchMeta.for_step([1, 1, 4, 2], [5, 3, 4, 2], tables, block_size=4)
    assert not meta.fresh
    (t0, decodes, cached), (t1, prompts, fresh) = meta.parts
    assert (t0, decodes.num_seqs, cached, t1, prompts.num_seqs, fresh) == (0, 2, True, 2, 2, False)
    out = attn(q, k, v, meta)
    expected = [reference(s[0][-1:], s[1], s[2]) for s in old]
    expected += [reference(*s) for s in new]
    torch.testing.assert_close(out, torch.cat(expected).flatten(1), atol=1e-10, rtol=0)
    # the same step without the split (one path for every row) agrees
    attn_again = paged_attention()
    attn_again.kv_cache.copy_(attn.kv_cache)
    whole = attn_again(q, k, v, dataclasses.replace(meta, parts=None))
    torch.testing.assert_close(out, whole, atol=1e-10, rtol=0)


def test_a_mixed_step_splits_into_runs_of_one_kind():
    tables = [[0, 1], [2], [3], [4]]

    def runs(query_lens, context_lens):
        meta = BatchMeta.for_step(query_lens, context_lens, tables, block_size=4)
        if meta.parts is None:
            return None
        return [(start, part.num_seqs, cached) for start, part, cached in meta.parts]

    # decodes, a later prompt chunk, fresh prompts: as the scheduler orders a step
    assert runs([1, 1, 3, 2], [6, 2, 4, 2]) == [(0, 2, True), (2, 1, True), (5, 1, False)]
    assert runs([1, 2, 2, 2], [5, 2, 2, 2]) == [(0, 1, True), (1, 3, False)]
    assert runs([1, 1, 1, 1], [5, 2, 3, 2]) is None  # decodes only
    assert runs([2, 2, 2, 2], [2, 2, 2, 2]) is None  # fresh only


def test_cache_write_lands_at_slot_mapping():
    seqs = random_seqs([3], seed=4)
    attn = paged_attention(block_size=2)
    attn(*packed(seqs), BatchMeta.for_step([3], [3], [[4, 1]], block_size=2))
    _, k, v = seqs[0]
    torch.testing.assert_close(attn.kv_cache[0, 4], k[:2])
    torch.testing.assert_close(attn.kv_cache[0, 1, 0], k[2])
    torch.testing.assert_close(attn.kv_cache[1, 1, 0], v[2])


def test_alibi_slopes_match_bloom_recipe():
    # powers of two: 2^(-8/n * (i+1)); BLOOM interleaves extra slopes for other head counts
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    six = alibi_slopes(6)
    torch.testing.assert_close(six[:4], alibi_slopes(4))
    torch.testing.assert_close(six[4:], torch.tensor([2**-1, 2**-3]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_paged_attention_equals_reference(dtype):
    lengths = [5, 1, 9]
    seqs = random_seqs(lengths, seed=5)
    attn = Attention(H, HKV, D, D**-0.5).cuda()
    attn.kv_cache = torch.zeros(2, 16, 4, HKV, D, dtype=dtype, device="cuda")
    tables = [[7, 3], [0], [15, 1, 9]]
    meta = BatchMeta.for_step(lengths, lengths, tables, block_size=4, device="cuda")
    q, k, v = (x.to("cuda", dtype) for x in packed(seqs))
    out = attn(q, k, v, meta).cpu()
    tol = 1e-4 if dtype == torch.float32 else 5e-3
    assert_matches_reference(out, seqs, atol=tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 256])
def test_cuda_flash_path_equals_reference_prefill_then_decode(dtype, block_size):
    # Prefill without a cache (packed flash), then the same sequences through the paged cache:
    # prefill of all but the last token, then one decode token each; every output matches the
    # float64 per-sequence reference.
    lengths = [5, 1, 9, 33]
    seqs = random_seqs(lengths, seed=6)
    q, k, v = (x.to("cuda", dtype) for x in packed(seqs))
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3  # bf16 keeps 8 mantissa bits
    attn = Attention(H, HKV, D, D**-0.5).cuda()
    out = attn(q, k, v, BatchMeta.for_prefill(lengths, device="cuda")).cpu()
    assert_matches_reference(out, seqs, atol=tol)
    grid = Attention(H, HKV, D, D**-0.5).cuda()
    grid.use_flash = False
    torch.testing.assert_close(
        out, grid(q, k, v, BatchMeta.for_prefill(lengths, device="cuda")).cpu(), atol=tol, rtol=0
    )

    attn.kv_cache = torch.zeros(2, 8, block_size, HKV, D, dtype=dtype, device="cuda")
    tables = [[5], [2], [7], [0, 3, 4] if block_size == 16 else [0]]  # 33 tokens: 3 x 16
    cut = [n - 1 if n > 1 else 1 for n in lengths]
    first = [[seq[i][: cut[b]] for i in range(3)] for b, seq in enumerate(seqs)]
    meta = BatchMeta.for_step(cut, cut, tables, block_size=block_size, device="cuda")
    pieces = attn(*(x.to("cuda", dtype) for x in packed(first)), meta).cpu()
    decode_rows = [b for b, n in enumerate(lengths) if n > 1]
    last = [[seqs[b][i][-1:] for i in range(3)] for b in decode_rows]
    meta = BatchMeta.for_step(
        [1] * len(decode_rows),
        [lengths[b] for b in decode_rows],
        [tables[b] for b in decode_rows],
        block_size=block_size,
        device="cuda",
    )
    tail = attn(*(x.to("cuda", dtype) for x in packed(last)), meta).cpu()
    start = 0
    for b, n in enumerate(cut):
        q_b, k_b, v_b = (x[:n] for x in seqs[b])
        expected = reference(q_b, k_b, v_b).flatten(1)
        torch.testing.assert_close(pieces[start : start + n].double(), expected, atol=tol, rtol=0)
        start += n
    for j, b in enumerate(decode_rows):
        q_b, k_b, v_b = seqs[b]
        expected = reference(q_b[-1:], k_b, v_b).flatten(1)[0]
        torch.testing.assert_close(tail[j].double(), expected, atol=tol, rtol=0)


def test_k_and_v_of_one_merged_projection_go_into_the_cache_as_one_pair():
    """The merged q/k/v output holds k and v side by side in each row: one index_copy_ writes
    both, into exactly the slots two separate copies fill; separate tensors take two copies."""
    from energon.parallel.attention import kv_pair

    T, H, num_blocks, block_size = 5, 4, 6, 4
    qkv = torch.randn(T, (H + 2 * HKV) * D, dtype=torch.float64)
    _, k, v = qkv.split([H * D, HKV * D, HKV * D], dim=-1)
    k, v = k.view(T, HKV, D), v.view(T, HKV, D)
    pair = kv_pair(k, v)
    assert pair is not None and torch.equal(pair[:, 0], k) and torch.equal(pair[:, 1], v)
    assert kv_pair(k.clone(), v.clone()) is None  # two buffers
    assert kv_pair(v, k) is None  # v before k
    slots = torch.tensor([9, 0, 23, 4, 12])
    want = torch.zeros(2, num_blocks * block_size, HKV, D, dtype=torch.float64)
    want[0, slots], want[1, slots] = k, v
    for keys, values in ((k, v), (k.clone(), v.clone())):
        attn = Attention(H, HKV, D, scale=D**-0.5)
        attn.kv_cache = torch.zeros(2, num_blocks, block_size, HKV, D, dtype=torch.float64)
        attn._write_cache(keys, values, slots)
        assert torch.equal(attn.kv_cache.flatten(1, 2), want)
