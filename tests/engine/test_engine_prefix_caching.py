"""Prefix caching through the Engine: requests that share a long prefix with earlier ones compute
only the rest, and still equal Hugging Face `generate` of each prompt alone, at pp=1 and at pp=2
with lookahead; penalties and seeded draws of a request with a cached prefix too (its first
sampled row still brings the sampling rank its history); a preemption's recompute starts from
the blocks it left cached; a burst of requests sharing a prefix new to the cache computes it once
(the others wait for the step computing it, then adopt it) unless ENERGON_PREFIX_WAIT=0;
prefix_caching=False computes everything.

The checkpoint is a tiny random Llama without tokenizer.json (prompts are token ids).
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from engine_helpers import (
    assert_greedy_equal,
    hf_greedy,
    hf_logits_of,
    hf_processed_greedy,
    make_llama,
    one_torch_thread,  # noqa: F401 (autouse)
    reference_sample,
)

from energon import Engine, InvalidRequest, SamplingParams

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(120)]

RNG = random.Random(7)
SYSTEM = [RNG.randrange(2, 128) for _ in range(37)]  # a shared "system prompt": 9 full blocks
PROMPTS = [SYSTEM + [RNG.randrange(2, 128) for _ in range(RNG.randint(1, 9))] for _ in range(8)]
NEW = 8
GREEDY = dict(temperature=0.0, ignore_eos=True)
PENALISED = SamplingParams(
    max_tokens=NEW, repetition_penalty=1.3, frequency_penalty=0.4, logit_bias={9: 0.1}, **GREEDY
)
DRAWN = SamplingParams(max_tokens=NEW, temperature=0.9, seed=11, ignore_eos=True)
_BURST_RNG = random.Random(8)
FRESH = [_BURST_RNG.randrange(2, 128) for _ in range(32)]  # 8 full blocks no request computed
# four requests of it, each then its own tokens (from the first on: no fifth block in common)
BURST = [FRESH + [10 + i] + [_BURST_RNG.randrange(2, 128) for _ in range(5)] for i in range(4)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-prefix")
    hf = make_llama(folder)
    return folder, hf, [hf_greedy(hf, p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("pp", [1, 2])
async def test_requests_with_a_cached_prefix_equal_their_solo_result(model, pp):
    folder, hf, refs = model
    async with Engine(str(folder), pp=pp, device="cpu", block_size=4) as engine:
        first = await engine.infer(PROMPTS[0], SamplingParams(max_tokens=NEW, **GREEDY))
        assert_greedy_equal(first.token_ids, refs[0])
        assert engine.stats()["prefix_cache_hit_tokens"] == 0
        done = await asyncio.gather(
            *(engine.infer(p, SamplingParams(max_tokens=NEW, **GREEDY)) for p in PROMPTS[1:]),
            engine.infer(PROMPTS[1], PENALISED),
            engine.infer(PROMPTS[2], DRAWN),
        )
        stats = engine.stats()
    for c, ref in zip(done, refs[1:], strict=False):
        assert_greedy_equal(c.token_ids, ref)
    # each says how much of its prompt it found cached: the system prompt's 9 blocks at least
    assert first.usage.cached_tokens == 0
    assert all(c.usage.cached_tokens >= 36 for c in done)
    prompts = [*PROMPTS[1:], PROMPTS[1], PROMPTS[2]]
    assert all(c.usage.cached_tokens < len(p) for c, p in zip(done, prompts, strict=True))
    # the penalised and the seeded request found the prefix cached and still got their history
    assert_greedy_equal(done[-2].token_ids, hf_processed_greedy(hf, PROMPTS[1], PENALISED))
    assert done[-1].token_ids == reference_sample(hf, PROMPTS[2], DRAWN)
    # each of the 9 later requests found at least the system prompt's 9 full blocks
    assert stats["prefix_cache_hit_tokens"] >= 9 * 36
    assert stats["num_used_blocks"] == 0


@pytest.fixture(scope="module")
def burst_refs(model):
    _, hf, _ = model
    return [hf_greedy(hf, p, NEW) for p in BURST]


@pytest.mark.parametrize(
    "options",
    [
        dict(pp=1),  # lookahead: the first request's next decode is chained meanwhile
        dict(pp=1, lookahead=False, max_steps_in_flight=2),  # nothing else to schedule meanwhile
        dict(pp=2),
    ],
    ids=["pp1", "pp1-two-in-flight", "pp2"],
)
async def test_a_burst_sharing_a_new_prefix_computes_it_once(model, burst_refs, options):
    folder, _, _ = model
    async with Engine(str(folder), device="cpu", block_size=4, **options) as engine:
        greedy = SamplingParams(max_tokens=NEW, **GREEDY)
        done = await asyncio.gather(*(engine.infer(p, greedy) for p in BURST))
        stats = engine.stats()
    for c, ref in zip(done, burst_refs, strict=True):
        assert_greedy_equal(c.token_ids, ref)
    # the first computed the 32-token prefix; the three others waited for it and found it cached
    assert [c.usage.cached_tokens for c in done] == [0, 32, 32, 32]
    assert stats["prefix_cache_hit_tokens"] == 3 * 32
    assert stats["num_used_blocks"] == 0


async def test_with_prefix_wait_off_a_burst_computes_its_shared_prefix_once_a_request(
    model, burst_refs, monkeypatch
):
    folder, _, _ = model
    monkeypatch.setenv("ENERGON_PREFIX_WAIT", "0")
    async with Engine(str(folder), device="cpu", block_size=4) as engine:
        greedy = SamplingParams(max_tokens=NEW, **GREEDY)
        done = await asyncio.gather(*(engine.infer(p, greedy) for p in BURST))
        assert engine.stats()["prefix_cache_hit_tokens"] == 0  # all four admitted at once
    for c, ref in zip(done, burst_refs, strict=True):
        assert_greedy_equal(c.token_ids, ref)


async def test_a_preempted_request_recomputes_from_its_cached_blocks(model):
    folder, hf, refs = model
    async with Engine(
        str(folder),
        device="cpu",
        block_size=4,
        kv_cache_memory=40 * 6144,  # 40 blocks of 4 tokens (2 KiB a layer, 3 layers)
    ) as engine:
        long = SamplingParams(max_tokens=40, **GREEDY)
        done = await asyncio.gather(*(engine.infer(p, long) for p in PROMPTS[:3]))
        stats = engine.stats()
    # 21 blocks each at the end, the system prompt's 9 shared: 9 + 3 x 12 > 40
    assert stats["num_preemptions"] >= 1
    # the second and third found the system prompt computed by the first; a recompute found
    # its blocks cached
    assert stats["prefix_cache_hit_tokens"] >= 3 * 36
    for c, p in zip(done, PROMPTS[:3], strict=True):
        assert_greedy_equal(c.token_ids, hf_greedy(hf, p, 40))


async def test_without_prefix_caching_every_prompt_is_computed(model):
    folder, _, refs = model
    async with Engine(str(folder), device="cpu", block_size=4, prefix_caching=False) as engine:
        for p, ref in zip(PROMPTS[:3], refs, strict=False):
            assert_greedy_equal(
                (await engine.infer(p, SamplingParams(max_tokens=NEW, **GREEDY))).token_ids, ref
            )
        assert engine.stats()["prefix_cache_hit_tokens"] == 0
    with pytest.raises(InvalidRequest, match="prefix_caching"):
        Engine(str(folder), device="cpu", prefix_caching="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
async def test_cuda_requests_with_a_cached_prefix_equal_their_solo_result(model):
    """On cuda (float32; decode graphs, prefill graphs for the first request, eager chunks for
    those that start after their cached prefix); the last request also asks for its prompt's
    logprobs (the Engine's prompt pass on cuda), checked against transformers."""
    folder, hf, refs = model
    async with Engine(str(folder), device="cuda", dtype="float32", block_size=4) as engine:
        first = await engine.infer(PROMPTS[0], SamplingParams(max_tokens=NEW, **GREEDY))
        params = [SamplingParams(max_tokens=NEW, **GREEDY)] * 6
        params.append(SamplingParams(max_tokens=NEW, prompt_logprobs=2, **GREEDY))
        done = await asyncio.gather(
            *(engine.infer(p, q) for p, q in zip(PROMPTS[1:], params, strict=True))
        )
        assert engine.stats()["prefix_cache_hit_tokens"] >= 7 * 36
    for c, ref in zip([first, *done], refs, strict=True):
        assert_greedy_equal(c.token_ids, ref)
    expected = torch.log_softmax(hf_logits_of(hf, PROMPTS[7]).double(), -1)
    rows = done[-1].prompt_logprobs
    assert rows[0] is None and len(rows) == len(PROMPTS[7])
    for i, row in enumerate(rows[1:]):
        assert row.token_id == PROMPTS[7][i + 1]
        assert row.logprob == pytest.approx(float(expected[i, row.token_id]), abs=1e-4)


async def test_the_workers_look_for_shared_prefixes_only_with_prefix_caching():
    """Only the prefix cache shares blocks: without it the workers are told not to look for
    groups (nor capture graphs for them)."""
    assert Engine("tiny", device="cpu").runner_kwargs()["shared_prefixes"] is True
    off = Engine("tiny", device="cpu", prefix_caching=False).runner_kwargs()
    assert off["shared_prefixes"] is False
