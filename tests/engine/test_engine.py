"""The Engine's request API on one worker: infer / stream / forward, SamplingParams, text,
cancellation and bad requests. One Engine (a tiny random Llama whose folder holds a trained BPE
tokenizer.json) serves the whole module; every expectation comes from Hugging Face
`transformers` run on the same checkpoint, or from the tokenizer itself.

Batching, preemption and admission control: test_engine_batching.py. Parity per family and
layout: test_engine_parity.py. Start-up, worker failures, embedding: test_engine_failures.py.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import torch
from engine_helpers import (
    MIN_MARGIN,
    Reference,
    assert_greedy_equal,
    comparable,
    hf_greedy,
    hf_logits_of,
    hf_processed_greedy,
    make_text_llama,
    one_torch_thread,  # noqa: F401 (autouse)
    reference_sample,
)

from energon import Engine, InvalidRequest, SamplingParams

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(60)]

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(folder, hf_model, tokenizer) of the module's checkpoint."""
    folder = tmp_path_factory.mktemp("text-llama")
    hf, tok = make_text_llama(folder)
    return folder, hf, tok


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(model):
    async with Engine(str(model[0]), device="cpu") as engine:
        yield engine


@pytest.fixture
def hf(model):
    return model[1]


@pytest.fixture
def tok(model):
    return model[2]


async def settle(engine: Engine) -> None:
    """Returns once every step sent before has come back: with pp=1 one step is in flight at a
    time, so a one-token request finishes only after them."""
    await engine.infer([5], SamplingParams(max_tokens=1, temperature=0))


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text).ids


# ---------------------------------------------------------------------------- infer / stream


async def test_infer_returns_text_ids_reason_usage_and_timings(engine, hf, tok):
    prompt = ids_of(tok, "the cat sat on")
    ref = hf_greedy(hf, prompt, 12)
    done = await engine.infer(prompt, SamplingParams(max_tokens=12, **GREEDY))
    assert assert_greedy_equal(done.token_ids, ref) == 12
    assert done.text == tok.decode(done.token_ids)
    assert done.finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt), 12)
    assert done.usage.total_tokens == len(prompt) + 12
    t = done.timings
    assert 0 <= t.queued_s <= t.first_token_s and t.per_output_token_s > 0


async def test_text_prompt_is_encoded_with_the_checkpoint_tokenizer(engine, hf, tok):
    text = "once upon a time"
    ref = hf_greedy(hf, ids_of(tok, text), 8)
    done = await engine.infer(text, SamplingParams(max_tokens=8, **GREEDY))
    assert done.usage.prompt_tokens == len(ids_of(tok, text))
    assert_greedy_equal(done.token_ids, ref)


async def test_stream_pieces_join_to_the_same_completion_as_infer(engine):
    prompt, params = "the dog sat", SamplingParams(max_tokens=20, **GREEDY)
    pieces = [piece async for piece in engine.stream(prompt, params)]
    done = await engine.infer(prompt, params)
    assert "".join(p.text for p in pieces) == done.text
    assert [t for p in pieces for t in p.token_ids] == done.token_ids
    assert [p.finish_reason for p in pieces] == [None] * (len(pieces) - 1) + ["length"]


async def test_stop_token_id_ends_generation_on_that_token(engine, hf, tok):
    prompt = ids_of(tok, "the cat sat")
    ref = hf_greedy(hf, prompt, 16).tokens
    k = next(i for i in range(3, 16) if ref[i] not in ref[:i])  # first time that token shows
    params = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[ref[k]])
    done = await engine.infer(prompt, params)
    assert (done.token_ids, done.finish_reason) == (ref[: k + 1], "stop")
    assert done.text == tok.decode(ref[:k])  # the stop token's own text is left out


async def test_stop_string_cuts_the_text_before_its_first_occurrence(engine, hf, tok):
    prompt = ids_of(tok, "the mat")
    ref_text = tok.decode(hf_greedy(hf, prompt, 24).tokens)
    j = next(j for j in range(4, len(ref_text) - 1) if "\ufffd" not in ref_text[j : j + 2])
    stop = ref_text[j : j + 2]
    params = SamplingParams(max_tokens=24, stop=[stop], **GREEDY)
    done = await engine.infer(prompt, params)
    assert (done.text, done.finish_reason) == (ref_text[: ref_text.find(stop)], "stop")
    assert stop in tok.decode(done.token_ids)  # it stopped on the token that completed it


async def test_a_stop_string_included_ends_the_text_streamed_or_not(engine, hf, tok):
    prompt = ids_of(tok, "the mat")
    ref_text = tok.decode(hf_greedy(hf, prompt, 24).tokens)
    j = next(j for j in range(4, len(ref_text) - 1) if "\ufffd" not in ref_text[j : j + 2])
    stop = ref_text[j : j + 2]
    params = SamplingParams(max_tokens=24, stop=[stop], include_stop_str_in_output=True, **GREEDY)
    done = await engine.infer(prompt, params)
    end = ref_text.find(stop) + len(stop)
    assert (done.text, done.finish_reason) == (ref_text[:end], "stop")
    pieces = [piece async for piece in engine.stream(prompt, params)]
    assert "".join(p.text for p in pieces) == ref_text[:end]


async def test_stream_never_emits_a_stop_string(engine, hf, tok):
    prompt = ids_of(tok, "the log")
    ref_text = tok.decode(hf_greedy(hf, prompt, 24).tokens)
    j = next(j for j in range(6, len(ref_text) - 2) if "\ufffd" not in ref_text[j : j + 3])
    stop = ref_text[j : j + 3]
    params = SamplingParams(max_tokens=24, stop=stop, **GREEDY)
    pieces = [piece async for piece in engine.stream(prompt, params)]
    assert "".join(p.text for p in pieces) == ref_text[: ref_text.find(stop)]
    assert pieces[-1].finish_reason == "stop"


async def test_min_tokens_equals_transformers_min_new_tokens(engine, hf, tok):
    prompt = ids_of(tok, "the dog sat")
    stop_id = hf_greedy(hf, prompt, 4).tokens[1]  # unconstrained, it would end at token 2
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=10,
            min_new_tokens=5,
            do_sample=False,
            eos_token_id=[stop_id],
            pad_token_id=0,
            output_scores=True,  # after the processors: the stop id at -inf for 5 tokens
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    margins = [float(s[0].topk(2).values.diff().abs()) for s in out.scores]
    ref = Reference(tokens, margins[: len(tokens)])
    params = SamplingParams(
        max_tokens=10, min_tokens=5, stop_token_ids=[stop_id], logprobs=1, **GREEDY
    )
    done = await engine.infer(prompt, params)
    assert stop_id not in done.token_ids[:5]
    assert assert_greedy_equal(done.token_ids, ref) >= 5
    if comparable(ref) == len(tokens):
        assert done.finish_reason == ("stop" if tokens[-1] == stop_id else "length")
    # the logprobs stay those of the raw distribution, where the stop id was the most likely
    assert done.logprobs[1].top[0][0] == stop_id != done.token_ids[1]


PENALTIES = {
    "repetition": dict(repetition_penalty=1.3),
    "frequency_presence": dict(frequency_penalty=0.8, presence_penalty=0.5),
    "negative": dict(frequency_penalty=-0.3, presence_penalty=-1.0, repetition_penalty=0.8),
    "bias": dict(logit_bias={40: 0.2, 41: 0.15, 1: -100}),
    "all": dict(repetition_penalty=1.2, frequency_penalty=0.4, logit_bias={40: 0.1}),
}


@pytest.mark.parametrize("kind", PENALTIES)
async def test_penalties_and_logit_bias_equal_transformers_processors(engine, hf, tok, kind):
    prompt = ids_of(tok, "the cat sat on the mat")
    params = SamplingParams(max_tokens=16, **GREEDY, **PENALTIES[kind])
    ref = hf_processed_greedy(hf, prompt, params)
    plain = hf_greedy(hf, prompt, 16)
    assert ref.tokens != plain.tokens  # the processors change this output
    done = await engine.infer(prompt, params)
    assert assert_greedy_equal(done.token_ids, ref) >= 8


async def test_penalised_draws_equal_the_reference_and_logprobs_stay_raw(engine, hf, tok):
    prompt = ids_of(tok, "once upon a time")
    params = SamplingParams(
        max_tokens=12,
        temperature=0.8,
        seed=7,
        ignore_eos=True,
        logprobs=1,
        **PENALTIES["all"],
    )
    first, second = await asyncio.gather(engine.infer(prompt, params), engine.infer(prompt, params))
    assert first.token_ids == second.token_ids == reference_sample(hf, prompt, params)
    for n, entry in enumerate(first.logprobs):
        raw = torch.log_softmax(hf_logits_of(hf, prompt + first.token_ids[:n])[-1], -1)
        assert entry.logprob == pytest.approx(float(raw[first.token_ids[n]]), abs=1e-4)


async def test_the_worker_drops_a_penalised_requests_counts_when_it_ends(engine, tok):
    params = SamplingParams(max_tokens=30, frequency_penalty=1.0, **GREEDY)
    stream = engine.stream(ids_of(tok, "the dog"), params)
    await stream.__anext__()  # sampled once: the worker counts its tokens
    assert (await engine.group.broadcast("info"))[0]["penalised_seqs"] == 1
    await stream.aclose()  # aborted
    await asyncio.gather(*(engine.infer([5, 6], params) for _ in range(3)))
    await settle(engine)  # the step after the last one ended says so
    assert (await engine.group.broadcast("info"))[0]["penalised_seqs"] == 0


async def test_logprobs_are_transformers_log_softmax(engine, hf, tok):
    prompt = ids_of(tok, "a tiny model")
    done = await engine.infer(prompt, SamplingParams(max_tokens=6, logprobs=3, **GREEDY))
    assert len(done.logprobs) == 6
    for n, entry in enumerate(done.logprobs):
        expected = torch.log_softmax(hf_logits_of(hf, prompt + done.token_ids[:n])[-1], -1)
        values, ids = expected.topk(4)
        assert entry.token_id == done.token_ids[n] == int(ids[0])
        assert entry.logprob == pytest.approx(float(values[0]), abs=1e-4)
        assert [v for _, v in entry.top] == pytest.approx(values[:3].tolist(), abs=1e-4)
        if float((values[:3] - values[1:]).min()) > MIN_MARGIN:  # order is not a near-tie
            assert [t for t, _ in entry.top] == ids[:3].tolist()


async def test_forward_returns_transformers_logits_per_sequence(engine, hf):
    seqs = [[5, 9, 3, 7], [42], [100, 12, 13, 14, 15, 16, 17]]
    logits = await engine.forward(seqs)
    assert [tuple(x.shape) for x in logits] == [(len(s), hf.config.vocab_size) for s in seqs]
    for got, seq in zip(logits, seqs, strict=True):
        torch.testing.assert_close(got, hf_logits_of(hf, seq), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- seeded sampling

SAMPLED = dict(max_tokens=12, temperature=0.8, top_k=40, top_p=0.9, ignore_eos=True)


async def test_seeded_sampling_draws_what_the_sampler_draws_from_transformers_logits(
    engine, hf, tok
):
    prompt = ids_of(tok, "the cat")
    params = SamplingParams(seed=1234, **SAMPLED)
    done = await engine.infer(prompt, params)
    assert done.token_ids == reference_sample(hf, prompt, params)


async def test_seeded_sampling_is_reproducible_and_seed_dependent(engine, tok):
    prompt = ids_of(tok, "the dog")
    first = await engine.infer(prompt, SamplingParams(seed=7, **SAMPLED))
    again = await engine.infer(prompt, SamplingParams(seed=7, **SAMPLED))
    other = await engine.infer(prompt, SamplingParams(seed=8, **SAMPLED))
    assert first.token_ids == again.token_ids
    assert other.token_ids != first.token_ids


async def test_seeded_sampling_does_not_depend_on_batch_mates(engine, tok):
    prompt, params = ids_of(tok, "sat on the"), SamplingParams(seed=99, **SAMPLED)
    alone = await engine.infer(prompt, params)
    mates = [
        engine.infer([7, 8, 9, 10, 11], SamplingParams(max_tokens=20, temperature=1.0)),
        engine.infer([3] * 30, SamplingParams(max_tokens=5, temperature=1.5, seed=1)),
        engine.infer([42], SamplingParams(max_tokens=9, temperature=0)),
    ]
    batched, *_ = await asyncio.gather(engine.infer(prompt, params), *mates)
    assert batched.token_ids == alone.token_ids


# ---------------------------------------------------------------------------- cancellation


async def test_cancelling_infer_aborts_the_request_and_frees_its_blocks(engine):
    free = engine.stats()["num_free_blocks"]
    task = asyncio.ensure_future(engine.infer([9] * 40, SamplingParams(max_tokens=500, **GREEDY)))
    await asyncio.sleep(0)  # submitted; its step goes out at the loop's next turn
    await asyncio.sleep(0)  # scheduled: its first step is in flight
    assert engine.stats()["num_free_blocks"] < free
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(engine)
    stats = engine.stats()
    assert (stats["num_free_blocks"], stats["num_running"], stats["requests"]) == (free, 0, 0)


async def test_closing_a_stream_early_aborts_the_request_and_frees_its_blocks(engine):
    free = engine.stats()["num_free_blocks"]
    stream = engine.stream([11] * 20, SamplingParams(max_tokens=500, **GREEDY))
    got = [await stream.__anext__() for _ in range(3)]
    assert sum(len(p.token_ids) for p in got) == 3
    await stream.aclose()
    await settle(engine)
    stats = engine.stats()
    assert (stats["num_free_blocks"], stats["num_running"], stats["requests"]) == (free, 0, 0)


# ---------------------------------------------------------------------------- bad requests


def tampered(**fields) -> SamplingParams:
    """SamplingParams changed after construction (it is frozen, but Python lets one force it):
    the Engine checks them again."""
    params = SamplingParams()
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


@pytest.mark.parametrize(
    "field,prompt,params",
    [
        ("prompt", [], None),
        ("prompt", "", None),
        ("prompt", [1, 2, 10**6], None),
        ("prompt", [1, 2.5], None),
        ("params", [1, 2], {"max_tokens": 4}),
        ("stop_token_ids", [1, 2], SamplingParams(stop_token_ids=[10**6])),
        ("max_tokens", [1, 2], SamplingParams(max_tokens=5000)),  # past max_position_embeddings
        ("top_p", [1, 2], tampered(top_p=0.0)),
        ("temperature", [1, 2], tampered(temperature=float("nan"))),
    ],
)
async def test_bad_requests_raise_before_queueing_and_leave_running_ones_alone(
    engine, hf, field, prompt, params
):
    good = [[5, 9, 3, 7], [64, 8, 8]]
    refs = [hf_greedy(hf, p, 10) for p in good]
    running = [
        asyncio.ensure_future(engine.infer(p, SamplingParams(max_tokens=10, **GREEDY)))
        for p in good
    ]
    await asyncio.sleep(0)  # both admitted and running
    before = engine.stats()
    with pytest.raises(InvalidRequest) as info:
        await engine.infer(prompt, params)
    assert info.value.field == field
    after = engine.stats()
    assert (after["requests"], after["num_waiting"]) == (before["requests"], before["num_waiting"])
    for task, ref in zip(running, refs, strict=True):
        assert_greedy_equal((await task).token_ids, ref)


async def test_prompt_logprobs_are_transformers_log_softmax_at_each_position(engine, hf, tok):
    prompts = [ids_of(tok, "the cat sat on the mat"), ids_of(tok, "naive dogs"), [7]]
    rows = await engine.prompt_logprobs(prompts, top=2)
    assert [len(r) for r in rows] == [len(p) - 1 for p in prompts]
    for prompt, got in zip(prompts, rows, strict=True):
        expected = torch.log_softmax(hf_logits_of(hf, prompt).double(), -1)
        for i, entry in enumerate(got):
            assert entry.token_id == prompt[i + 1]
            assert entry.logprob == pytest.approx(float(expected[i, prompt[i + 1]]), abs=1e-4)
            values, _ = expected[i].topk(2)
            assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
    assert (await engine.prompt_logprobs([[5, 6]]))[0][0].top == []
    window = engine.config["max_position_embeddings"]
    with pytest.raises(InvalidRequest, match=f"at most {window} tokens"):
        await engine.prompt_logprobs([[5] * (window + 1)])


async def test_a_request_with_prompt_logprobs_gets_them_with_its_completion(engine, hf, tok):
    prompt = ids_of(tok, "the cat sat")
    params = SamplingParams(max_tokens=3, prompt_logprobs=2, **GREEDY)
    done = await engine.infer(prompt, params)
    pieces = [p async for p in engine.stream(prompt, params)]
    [alone] = await engine.prompt_logprobs([prompt], top=2)
    assert done.prompt_logprobs == [None, *alone] == pieces[-1].prompt_logprobs
    assert [p.prompt_logprobs for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    expected = torch.log_softmax(hf_logits_of(hf, prompt).double(), -1)
    for i, entry in enumerate(done.prompt_logprobs[1:]):
        assert entry.token_id == prompt[i + 1]
        assert entry.logprob == pytest.approx(float(expected[i, prompt[i + 1]]), abs=1e-4)
    assert done.token_ids == hf_greedy(hf, prompt, 3).tokens
    assert (await engine.infer(prompt, SamplingParams(max_tokens=2))).prompt_logprobs is None
    for bad in (21, -1, True, 1.5):
        with pytest.raises(InvalidRequest) as info:
            SamplingParams(prompt_logprobs=bad)
        assert info.value.field == "prompt_logprobs"


@pytest.mark.parametrize(
    ("lists", "top", "field"),
    [
        ([[5, 6]], 21, "top"),
        ([[5, 6]], True, "top"),
        ([[]], 0, "token_lists"),
        ([[10**6]], 0, "token_lists"),
    ],
)
async def test_prompt_logprobs_refuses_bad_input_by_name(engine, lists, top, field):
    with pytest.raises(InvalidRequest) as info:
        await engine.prompt_logprobs(lists, top)
    assert info.value.field == field
