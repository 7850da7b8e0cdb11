"""Continuous batching through the Engine: many requests at once, requests joining a running
batch, pp micro-batches in flight, preemption under a tiny KV cache, admission control, EOS.

The checkpoint is a tiny random Llama without tokenizer.json (prompts are token ids) whose EOS
is set to a token its greedy continuations often produce, so stopping at EOS is exercised too.
Each request's expected tokens are Hugging Face `generate` on that prompt alone.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest
import pytest_asyncio
import torch
from engine_helpers import (
    Reference,
    assert_greedy_equal,
    hf_greedy,
    hf_logits_of,
    hf_processed_greedy,
    make_llama,
    one_torch_thread,  # noqa: F401 (autouse)
    random_prompts,
    reference_sample,
)

from energon import Engine, InvalidRequest, Overloaded, SamplingParams

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(90)]

PROMPTS = random_prompts(200, vocab=128, seed=0, new=(1, 16))  # (prompt, max_tokens)
MAX_WAITING = 8
GREEDY = dict(temperature=0.0, ignore_eos=True)
# counted on the last stage's sampling rank, which never sees the input ids
PENALISED = SamplingParams(
    max_tokens=20, repetition_penalty=1.25, frequency_penalty=0.5, logit_bias={7: 0.05}, **GREEDY
)
PENALISED_DRAW = SamplingParams(
    max_tokens=16, temperature=1.0, seed=3, ignore_eos=True, presence_penalty=1.5
)


def with_eos(ref: Reference, eos: int) -> Reference:
    """What greedy generation with EOS gives: the same tokens, up to and including the first
    EOS (greedy decoding does not depend on where it will stop)."""
    if eos not in ref.tokens:
        return ref
    n = ref.tokens.index(eos) + 1
    return Reference(ref.tokens[:n], ref.margins[:n])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(folder, hf_model, eos, {i: Reference without EOS}) with EOS set, in config.json and
    generation_config.json, to a token that ends some but not most of PROMPTS' continuations."""
    folder = tmp_path_factory.mktemp("llama-ids")
    hf = make_llama(folder)
    refs = [hf_greedy(hf, p, n) for p, n in PROMPTS]
    seen = Counter(t for r in refs for t in set(r.tokens))
    eos = next(t for t, c in seen.most_common() if c <= len(PROMPTS) // 5)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = eos
        (folder / name).write_text(json.dumps(config))
    return folder, hf, eos, refs


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def pp_engine(model):
    """Two pipeline stages with lookahead (the default): two micro-batches, each with its next
    step chained behind the one in flight."""
    async with Engine(str(model[0]), pp=2, device="cpu") as engine:
        yield engine


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def small_engine(model):
    """Two stages and a KV cache of a few 4-token blocks; at most MAX_WAITING wait."""
    async with Engine(
        str(model[0]),
        pp=2,
        device="cpu",
        block_size=4,
        kv_cache_memory=12 * 4096,  # stage 0 holds 2 layers: 4 KiB per block of 4 tokens
        max_waiting=MAX_WAITING,
    ) as engine:
        yield engine


async def test_200_concurrent_requests_each_equal_their_solo_result(pp_engine, model):
    _, _, eos, refs = model
    done = await asyncio.gather(
        *(pp_engine.infer(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in PROMPTS)
    )
    compared = 0
    for c, ref in zip(done, refs, strict=True):
        expected = with_eos(ref, eos)
        compared += assert_greedy_equal(c.token_ids, expected)
        if len(c.token_ids) == len(expected.tokens):
            stopped = expected.tokens[-1] == eos
            assert c.finish_reason == ("stop" if stopped else "length")
    assert compared >= 0.95 * sum(len(with_eos(r, eos).tokens) for r in refs)
    assert sum(c.finish_reason == "stop" for c in done) >= 10  # EOS did end some of them
    assert pp_engine.stats()["num_used_blocks"] == 0


async def test_prompt_logprobs_come_from_the_last_stage(pp_engine, model):
    hf = model[1]
    prompt = PROMPTS[0][0]
    (rows,) = await pp_engine.prompt_logprobs([prompt], top=1)
    expected = torch.log_softmax(hf_logits_of(hf, prompt).double(), -1)
    assert [r.token_id for r in rows] == prompt[1:]
    for i, r in enumerate(rows):
        assert r.logprob == pytest.approx(float(expected[i, prompt[i + 1]]), abs=1e-4)
        assert r.top[0][1] == pytest.approx(float(expected[i].max()), abs=1e-4)


async def test_generation_stops_at_the_checkpoint_eos_unless_ignore_eos(pp_engine, model):
    _, _, eos, refs = model
    i = next(i for i, r in enumerate(refs) if eos in r.tokens[:-1])
    prompt, n = PROMPTS[i]
    stopped = await pp_engine.infer(prompt, SamplingParams(max_tokens=n, temperature=0))
    ignored = await pp_engine.infer(prompt, SamplingParams(max_tokens=n, **GREEDY))
    assert_greedy_equal(stopped.token_ids, with_eos(refs[i], eos))
    assert (stopped.finish_reason, stopped.token_ids[-1]) == ("stop", eos)
    assert_greedy_equal(ignored.token_ids, refs[i])
    assert (ignored.finish_reason, len(ignored.token_ids)) == ("length", n)


def greedy(prompts, more: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """(prompt, greedy params for n + `more` tokens) of each (prompt, n)."""
    return [(p, SamplingParams(max_tokens=n + more, **GREEDY)) for p, n in prompts]


async def submit(engine: Engine, requests) -> list[asyncio.Future]:
    """(prompt, params) requests submitted together; returns once their first steps are sent."""
    tasks = [asyncio.ensure_future(engine.infer(p, params)) for p, params in requests]
    await asyncio.sleep(0)  # they submit; the loop's next turn sends their steps together
    await asyncio.sleep(0)
    return tasks


async def stage_infos(engine: Engine) -> list[dict]:
    return await engine.group.broadcast("info")


async def test_pipeline_chains_each_micro_batch_behind_its_step_in_flight(pp_engine, model):
    _, hf, _, refs = model
    assert pp_engine.max_steps_in_flight == 2  # pp: the last stage hands tokens to the first
    before = (await stage_infos(pp_engine))[0]["chained_steps"]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    sampled_prompt = [3, 1, 4, 1, 5, 9]
    tasks = await submit(pp_engine, [*greedy(PROMPTS[:3], more=2), (sampled_prompt, sampled)])
    # two micro-batches of 2, then each one's next step, chained to it, before any returned
    plans = pp_engine.scheduler.in_flight
    assert [len(p.seqs) for p in plans] == [2, 2, 2, 2]
    assert [p.chains for p in plans] == [None, None, plans[0].step_id, plans[1].step_id]
    done = await asyncio.gather(*tasks)
    for c, (p, n) in zip(done, PROMPTS[:3], strict=False):
        assert_greedy_equal(c.token_ids, hf_greedy(hf, p, n + 2))
    assert done[-1].token_ids == reference_sample(hf, sampled_prompt, sampled)
    infos = await stage_infos(pp_engine)
    first = [i for i in infos if i["stage"] == 0]
    assert first[0]["chained_steps"] - before >= 8  # most of each request's decode steps
    # idle, the Engine had the first stage drop (and receive) every token no step took
    assert all(i["returns_pending"] == 0 for i in first)
    assert pp_engine.stats()["num_used_blocks"] == 0


async def test_pipeline_without_lookahead_keeps_one_micro_batch_more_than_stages(model):
    refs = model[3]
    async with Engine(str(model[0]), pp=2, device="cpu", lookahead=False) as engine:
        assert engine.max_steps_in_flight == 3  # pp + 1: one waits while a reply travels back
        tasks = await submit(engine, greedy(PROMPTS[:4]))
        # 2, 1 and 1 of them: every micro-batch in flight before step 1 returned
        assert engine.stats()["steps_in_flight"] == 3
        assert sorted(len(p.seqs) for p in engine.scheduler.in_flight) == [1, 1, 2]
        for task, ref in zip(tasks, refs[:4], strict=True):
            assert_greedy_equal((await task).token_ids, ref)
        assert all(i["chained_steps"] == 0 for i in await stage_infos(engine))


async def test_new_request_joins_the_running_batch_at_the_next_step(pp_engine, model):
    refs = model[3]
    long_prompt, short_prompt = PROMPTS[0][0], PROMPTS[1][0]
    long_tokens: list[int] = []
    started = asyncio.Event()

    async def consume_long():
        params = SamplingParams(max_tokens=100, **GREEDY)
        async for piece in pp_engine.stream(long_prompt, params):
            long_tokens.extend(piece.token_ids)
            started.set()

    long_task = asyncio.ensure_future(consume_long())
    await started.wait()
    at_submit = len(long_tokens)
    n = PROMPTS[1][1]
    short = await pp_engine.infer(short_prompt, SamplingParams(max_tokens=n, **GREEDY))
    # The short request ran its n steps beside the long one, which was not held up either.
    assert len(long_tokens) <= at_submit + n + 2
    assert not long_task.done()
    assert_greedy_equal(short.token_ids, refs[1])
    await long_task
    assert len(long_tokens) == 100


async def test_preemption_under_a_tiny_kv_cache_gives_identical_outputs(small_engine, model):
    _, hf, _, refs = model
    capacity = small_engine.stats()["num_free_blocks"] * 4
    picked = [i for i, (p, n) in enumerate(PROMPTS) if 12 <= len(p) + n <= capacity][:6]
    assert sum(len(PROMPTS[i][0]) + PROMPTS[i][1] for i in picked) > 2 * capacity
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
    sampled_prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    done = await asyncio.gather(
        *(
            small_engine.infer(PROMPTS[i][0], SamplingParams(max_tokens=PROMPTS[i][1], **GREEDY))
            for i in picked
        ),
        small_engine.infer(sampled_prompt, sampled),
        small_engine.infer(sampled_prompt, PENALISED),
        small_engine.infer(sampled_prompt, PENALISED_DRAW),
    )
    stats = small_engine.stats()
    assert stats["num_preemptions"] > 0  # the cache was too small for them all at once
    for c, i in zip(done, picked, strict=False):
        assert_greedy_equal(c.token_ids, refs[i])
    assert done[-3].token_ids == reference_sample(hf, sampled_prompt, sampled)
    # a preempted sequence's recompute brings its token counts back on the sampling rank
    assert_greedy_equal(done[-2].token_ids, hf_processed_greedy(hf, sampled_prompt, PENALISED))
    assert done[-1].token_ids == reference_sample(hf, sampled_prompt, PENALISED_DRAW)
    assert stats["num_used_blocks"] == 0


async def test_a_full_kv_reserve_serves_the_same_workload_without_preempting(model):
    """The preemption test's workload on an Engine that keeps room for every admitted request
    to reach max_tokens: it waits instead of preempting, and the outputs are the same."""
    _, _, _, refs = model
    async with Engine(
        str(model[0]),
        pp=2,
        device="cpu",
        block_size=4,
        kv_cache_memory=12 * 4096,
        kv_reserve=1.0,
    ) as engine:
        capacity = engine.stats()["num_free_blocks"] * 4
        picked = [i for i, (p, n) in enumerate(PROMPTS) if 12 <= len(p) + n <= capacity][:6]
        assert sum(len(PROMPTS[i][0]) + PROMPTS[i][1] for i in picked) > 2 * capacity
        done = await asyncio.gather(
            *(
                engine.infer(PROMPTS[i][0], SamplingParams(max_tokens=PROMPTS[i][1], **GREEDY))
                for i in picked
            )
        )
        stats = engine.stats()
    assert stats["num_preemptions"] == 0
    for c, i in zip(done, picked, strict=True):
        assert_greedy_equal(c.token_ids, refs[i])
    assert stats["num_used_blocks"] == 0


async def test_requests_past_max_waiting_are_refused_at_once_with_overloaded(small_engine, model):
    refs = model[3]
    capacity = small_engine.stats()["num_free_blocks"] * 4
    picked = [i for i, (p, n) in enumerate(PROMPTS) if len(p) + n <= capacity][:20]
    tasks = {
        i: asyncio.ensure_future(
            small_engine.infer(PROMPTS[i][0], SamplingParams(max_tokens=PROMPTS[i][1], **GREEDY))
        )
        for i in picked
    }
    await asyncio.sleep(0)  # every infer ran up to its first wait; no step has come back
    stats = small_engine.stats()
    refused = [i for i, t in tasks.items() if t.done()]
    assert stats["num_waiting"] == MAX_WAITING
    assert len(refused) == 20 - MAX_WAITING - stats["num_running"]
    for i in refused:
        with pytest.raises(Overloaded, match="max_waiting"):
            tasks[i].result()
    for i, t in tasks.items():
        if i not in refused:
            assert_greedy_equal((await t).token_ids, refs[i])


async def test_text_prompt_without_tokenizer_json_is_an_invalid_request(pp_engine):
    with pytest.raises(InvalidRequest, match="tokenizer.json") as info:
        await pp_engine.infer("hello")
    assert info.value.field == "prompt"


# ---- lookahead at pp=1: the next decode step goes out before the last one returns -----------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def lookahead_engine(model):
    """One stage, lookahead on (the default), a KV cache small enough to preempt."""
    async with Engine(
        str(model[0]), device="cpu", block_size=4, kv_cache_memory=40 * 8192
    ) as engine:
        yield engine


async def chained_steps(engine: Engine) -> int:
    return (await engine.group.broadcast("info"))[0]["chained_steps"]


async def test_lookahead_keeps_two_steps_in_flight_and_equals_solo_results(lookahead_engine, model):
    _, hf, eos, refs = model
    before = await chained_steps(lookahead_engine)
    sampled = SamplingParams(max_tokens=16, temperature=1.0, seed=9, ignore_eos=True)
    sampled_prompt = [2, 7, 1, 8, 2, 8]
    tasks = [
        asyncio.ensure_future(
            lookahead_engine.infer(p, SamplingParams(max_tokens=n, temperature=0))
        )
        for p, n in PROMPTS
    ]
    tasks.append(asyncio.ensure_future(lookahead_engine.infer(sampled_prompt, sampled)))
    penalised = [lookahead_engine.infer(sampled_prompt, p) for p in (PENALISED, PENALISED_DRAW)]
    tasks.extend(asyncio.ensure_future(p) for p in penalised)
    await asyncio.sleep(0)  # every request submits
    await asyncio.sleep(0)  # then the first step (all of them) and the one chained to it go out
    assert lookahead_engine.stats()["steps_in_flight"] == 2
    done = await asyncio.gather(*tasks)
    compared = 0
    for c, ref in zip(done, refs, strict=False):
        expected = with_eos(ref, eos)
        compared += assert_greedy_equal(c.token_ids, expected)
        if len(c.token_ids) == len(expected.tokens):
            assert c.finish_reason == ("stop" if expected.tokens[-1] == eos else "length")
    assert compared >= 0.95 * sum(len(with_eos(r, eos).tokens) for r in refs)
    assert sum(c.finish_reason == "stop" for c in done) >= 10  # stops while a step was chained
    assert done[-3].token_ids == reference_sample(hf, sampled_prompt, sampled)
    # counted on the device from the chained samples the controller does not know yet
    assert_greedy_equal(done[-2].token_ids, hf_processed_greedy(hf, sampled_prompt, PENALISED))
    assert done[-1].token_ids == reference_sample(hf, sampled_prompt, PENALISED_DRAW)
    stats = lookahead_engine.stats()
    assert stats["num_preemptions"] > 0
    assert stats["num_used_blocks"] == 0
    assert await chained_steps(lookahead_engine) - before > 50
    # the samples a chained step may still feed: at most the two steps in flight
    assert (await lookahead_engine.group.broadcast("info"))[0]["returns_pending"] <= 2


async def test_without_lookahead_one_step_is_in_flight_and_none_is_chained(model):
    refs = model[3]
    async with Engine(str(model[0]), device="cpu", lookahead=False) as engine:
        tasks = await submit(engine, greedy(PROMPTS[:4]))
        assert engine.stats()["steps_in_flight"] == 1
        for task, ref in zip(tasks, refs[:4], strict=True):
            assert_greedy_equal((await task).token_ids, ref)
        assert await chained_steps(engine) == 0


async def test_lookahead_must_be_a_bool():
    with pytest.raises(InvalidRequest, match="lookahead"):
        Engine("tiny", lookahead="yes")
