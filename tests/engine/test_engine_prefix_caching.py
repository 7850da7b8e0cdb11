"""Prefix caching through the Engine: requests that share a long prefix with earlier ones compute
only the rest, and still equal Hugging Face `generate` of each prompt alone, at pp=1 and at pp=2
with lookahead; penalties and seeded draws of a request with a cached prefix too (its first
sampled row still brings the sampling rank its history); a preemption's recompute starts from
the blocks it left cached; prefix_caching=False computes everything.

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


async def test_a_preempted_request_recomputes_from_its_cached_blocks(model):
    folder, hf, refs = model
    async with Engine(
        str(folder),
        device="cpu",
        block_size=4,
        kv_cache_memory=40 * 8192,  # 40 blocks of 4 tokens (2 KiB a layer, 4 layers)
    ) as engine:
        long = SamplingParams(max_tokens=40, **GREEDY)
        done = await asyncio.gather(*(engine.infer(p, long) for p in PROMPTS[:3]))
        stats = engine.stats()
    assert stats["num_preemptions"] >= 1
    assert stats["prefix_cache_hit_tokens"] >= 36  # a recompute found its blocks cached
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
