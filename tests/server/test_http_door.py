"""The HTTP door: OpenAI routes with aiohttp as the client, SSE, limits, errors, metrics."""

from __future__ import annotations

import json

import aiohttp
import pytest

from energon import SamplingParams
from energon.server.client import Client
from energon.tokenizer import ByteTokenizer

BODY = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0}


async def post(server, path: str, body, **kwargs) -> tuple[int, dict]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    async with aiohttp.ClientSession() as s:
        async with s.post(server.http + path, data=data, **kwargs) as resp:
            return resp.status, await resp.json()


async def sse(server, path: str, body) -> list[dict]:
    """The stream's events (parsed), up to and excluding [DONE], which must end it."""
    events = []
    async with aiohttp.ClientSession() as s:
        async with s.post(server.http + path, json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            async for line in resp.content:
                line = line.decode().strip()
                if not line:
                    continue
                assert line.startswith("data: ")
                if line == "data: [DONE]":
                    return events
                events.append(json.loads(line[6:]))
    raise AssertionError(f"stream ended without [DONE] after {events}")


async def test_completion_equals_the_zmq_doors_result(server):
    status, body = await post(server, "/v1/completions", BODY)
    assert status == 200
    async with Client(server.zmq) as client:
        ref = await client.infer("Hello", SamplingParams(max_tokens=8, temperature=0.0))
    (choice,) = body["choices"]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert choice["text"] == ref.text and choice["finish_reason"] == ref.finish_reason
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": len(ref.token_ids),
        "total_tokens": 5 + len(ref.token_ids),
        "prompt_tokens_details": {"cached_tokens": 0},  # not one full block of 16
    }
    assert ref.usage.cached_tokens == 0


async def test_usage_counts_the_prompt_tokens_found_in_the_prefix_cache(server):
    """A prompt sent again finds its full 16-token blocks computed (the last token is always
    computed again), through the HTTP door and the ZeroMQ door alike."""
    prompt = "The same long prompt, sent twice to the tiny model: 50 bytes."  # 61 byte tokens
    body = {**BODY, "prompt": prompt, "max_tokens": 2}
    _, first = await post(server, "/v1/completions", body)
    _, again = await post(server, "/v1/completions", body)
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in (first, again)]
    assert first["usage"]["prompt_tokens"] == 61 and cached == [0, 48]
    events = await sse(
        server,
        "/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}
    async with Client(server.zmq) as client:
        done = await client.infer(prompt, SamplingParams(max_tokens=2, temperature=0.0))
    assert done.usage.cached_tokens == 48


async def test_streamed_completion_concatenates_to_the_whole_one(server):
    _, whole = await post(server, "/v1/completions", BODY)
    events = await sse(
        server,
        "/v1/completions",
        {**BODY, "stream": True, "stream_options": {"include_usage": True}},
    )
    texts = [e["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == whole["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


async def test_a_list_of_prompts_gives_one_choice_each_in_order(server):
    _, one = await post(server, "/v1/completions", {**BODY, "prompt": "b"})
    status, body = await post(server, "/v1/completions", {**BODY, "prompt": ["a", "b", [99]]})
    assert status == 200
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["choices"][1]["text"] == one["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == 3


async def test_several_prompts_stream_interleaved_choices_equal_the_whole_ones(server):
    body = {**BODY, "prompt": ["a", "Hello", [99]], "logprobs": 1, "ignore_eos": True}
    _, whole = await post(server, "/v1/completions", body)
    events = await sse(
        server,
        "/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    *pieces, usage = events
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    for want in whole["choices"]:
        mine = [e["choices"][0] for e in pieces if e["choices"][0]["index"] == want["index"]]
        assert "".join(c["text"] for c in mine) == want["text"]
        assert [c["finish_reason"] for c in mine][-1:] == [want["finish_reason"]]
        assert all(c["finish_reason"] is None for c in mine[:-1])
        tokens = [t for c in mine for t in c["logprobs"]["tokens"]]
        assert tokens == want["logprobs"]["tokens"]
    assert {e["choices"][0]["index"] for e in pieces} == {0, 1, 2}


async def test_one_bad_prompt_among_streamed_ones_is_a_400_and_frees_the_others(server):
    body = {**BODY, "prompt": ["a", [0] * 100_000], "stream": True}
    status, reply = await post(server, "/v1/completions", body)
    assert status == 400 and reply["error"]["param"] == "prompt", reply
    await server.wait_idle()


async def test_n_choices_are_the_seeded_single_requests_and_count_the_prompt_once(server):
    body = {**BODY, "prompt": ["Hello", "a"], "n": 2, "temperature": 1.0, "seed": 7}
    status, whole = await post(server, "/v1/completions", body)
    assert status == 200, whole
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2, 3]
    singles = []
    for prompt in ("Hello", "a"):
        for seed in (7, 8):
            _, one = await post(server, "/v1/completions", {**BODY, "prompt": prompt, "temperature": 1.0, "seed": seed})  # fmt: skip
            singles.append(one)
    assert [c["text"] for c in whole["choices"]] == [o["choices"][0]["text"] for o in singles]
    assert whole["usage"]["prompt_tokens"] == len(b"Hello") + len(b"a")
    assert whole["usage"]["completion_tokens"] == sum(o["usage"]["completion_tokens"] for o in singles)  # fmt: skip
    events = await sse(server, "/v1/completions", {**body, "stream": True})
    for want in whole["choices"]:
        mine = [e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == want["index"]]  # fmt: skip
        assert "".join(mine) == want["text"]


async def test_chat_uses_the_fallback_template_and_streams(server):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    chat["temperature"] = 0
    status, body = await post(server, "/v1/chat/completions", chat)
    assert status == 200 and body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    # tiny has no chat template: "user: Hi\nassistant:" is the prompt
    assert body["usage"]["prompt_tokens"] == len(b"user: Hi\nassistant:")
    events = await sse(server, "/v1/chat/completions", {**chat, "stream": True})
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == message["content"]
    assert events[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


async def test_completion_logprobs_equal_the_zmq_doors_in_whole_and_streamed(server):
    body = {**BODY, "max_tokens": 6, "ignore_eos": True, "logprobs": 3}
    _, whole = await post(server, "/v1/completions", body)
    async with Client(server.zmq) as client:
        ref = await client.infer("Hello", SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True))  # fmt: skip
    (choice,) = whole["choices"]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]  # one byte (ASCII here) per token
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(6)]
    assert lp["token_logprobs"] == pytest.approx([r.logprob for r in ref.logprobs], abs=1e-6)
    for top, r in zip(lp["top_logprobs"], ref.logprobs, strict=True):
        # keyed by token string: ids that are half a character each all show as U+FFFD
        strings = {ByteTokenizer().decode([t]): v for t, v in reversed(r.top)}
        assert len(r.top) == 3 and top == pytest.approx(strings, abs=1e-6)
    # greedy: the chosen token is the most likely one
    assert lp["token_logprobs"] == [max(top.values()) for top in lp["top_logprobs"]]

    events = await sse(server, "/v1/completions", {**body, "stream": True})
    streamed = {k: [x for e in events for x in e["choices"][0]["logprobs"][k]] for k in lp}
    assert streamed == lp


async def test_chat_logprobs_show_the_asked_alternatives(server):
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    chat.update(temperature=0, ignore_eos=True, logprobs=True, top_logprobs=2)
    status, body = await post(server, "/v1/chat/completions", chat)
    assert status == 200, body
    (choice,) = body["choices"]
    content = choice["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == choice["message"]["content"]
    for c in content:
        assert bytes(c["bytes"]).decode() == c["token"]
        assert [a["token"] for a in c["top_logprobs"]][:1] == [c["token"]]
        assert len(c["top_logprobs"]) == 2 and c["logprob"] == c["top_logprobs"][0]["logprob"]
    events = await sse(server, "/v1/chat/completions", {**chat, "stream": True})
    assert [
        c for e in events for c in (e["choices"][0]["logprobs"] or {}).get("content", [])
    ] == content


async def test_stop_token_ids_end_the_completion_at_that_token(server):
    _, free = await post(server, "/v1/completions", {**BODY, "ignore_eos": True})
    text = free["choices"][0]["text"]
    stop_at = ord(text[3])  # the byte tokenizer: one id per (ASCII) character
    _, stopped = await post(
        server, "/v1/completions", {**BODY, "ignore_eos": True, "stop_token_ids": [stop_at]}
    )
    (choice,) = stopped["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == text[: text.index(text[3])]


async def test_penalties_and_logit_bias_equal_the_zmq_doors_result(server):
    fields = dict(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.2)
    _, free = await post(server, "/v1/completions", {**BODY, "max_tokens": 24, "ignore_eos": True})
    biased = {"logit_bias": {str(ord("z")): 100}}  # the byte tokenizer: "z" is one token
    _, penalised = await post(
        server, "/v1/completions", {**BODY, "max_tokens": 24, "ignore_eos": True, **fields}
    )
    _, zs = await post(server, "/v1/completions", {**BODY, **biased})
    async with Client(server.zmq) as client:
        ref = await client.infer(
            "Hello", SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **fields)
        )
    assert penalised["choices"][0]["text"] == ref.text != free["choices"][0]["text"]
    assert zs["choices"][0]["text"] == "z" * 8


async def test_echo_puts_the_prompt_and_its_logprobs_first(server):
    rules = dict(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)
    async with Client(server.zmq) as client:
        ref = await client.infer("Hello", SamplingParams(**rules))
    head = list(b"Hello") + ref.token_ids[:3]
    body = {**BODY, "prompt": head, "max_tokens": 1, "ignore_eos": True, "logprobs": 2}
    _, echoed = await post(server, "/v1/completions", {**body, "echo": True})
    _, alone = await post(server, "/v1/completions", body)
    (choice,) = echoed["choices"]
    got = choice["logprobs"]
    assert len(got["tokens"]) == 9 and choice["text"].endswith(alone["choices"][0]["text"])
    assert got["text_offset"] == [sum(map(len, got["tokens"][:i])) for i in range(9)]
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    # the prompt pass gives what generation gave at the same positions
    expected = [lp.logprob for lp in ref.logprobs]
    assert got["token_logprobs"][5:] == pytest.approx(expected, abs=1e-5)
    # (two alternatives that show as the same string, U+FFFD, are one entry)
    assert all(1 <= len(m) <= 2 for m in got["top_logprobs"][1:])
    assert echoed["usage"]["prompt_tokens"] == 8 and echoed["usage"]["completion_tokens"] == 1

    _, bare = await post(server, "/v1/completions", {**BODY, "echo": True, "n": 2})
    _, text_only = await post(server, "/v1/completions", BODY)
    expected_text = "Hello" + text_only["choices"][0]["text"]
    assert [c["text"] for c in bare["choices"]] == [expected_text] * 2
    events = await sse(server, "/v1/completions", {**BODY, "echo": True, "stream": True})
    assert events[0]["choices"][0]["text"] == "Hello"
    assert "".join(e["choices"][0]["text"] for e in events) == expected_text
    _, ids = await post(server, "/v1/completions", {**BODY, "prompt": [72, 105], "echo": True})
    assert ids["choices"][0]["text"].startswith("Hi")


async def test_models_health_and_metrics(server):
    async with aiohttp.ClientSession() as s:
        async with s.get(server.http + "/v1/models") as resp:
            models = await resp.json()
        async with s.get(server.http + "/health") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    await post(server, "/v1/completions", BODY)
    m = await server.metrics()
    for name in (
        'energon_requests_total{door="http",outcome="ok"}',
        "energon_generation_tokens_total",
        "energon_prompt_tokens_total",
        "energon_queue_depth",
        "energon_kv_blocks_used",
        "energon_kv_blocks_total",
        "energon_preemptions_total",
        "energon_time_to_first_token_seconds_count",
        "energon_time_per_output_token_seconds_count",
    ):
        assert name in m, name
    assert m["energon_time_to_first_token_seconds_count"] >= 1
    assert m["energon_kv_blocks_total"] > 0


@pytest.mark.parametrize("prompts", [1, 3])
async def test_a_client_that_disconnects_mid_stream_aborts_its_requests(server, prompts):
    before = (await server.metrics()).get(
        'energon_requests_total{door="http",outcome="aborted"}', 0
    )
    body = {**BODY, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    body["prompt"] = ["Hello"] * prompts
    async with aiohttp.ClientSession() as s:
        async with s.post(server.http + "/v1/completions", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    break
            assert (await server.metrics())["energon_kv_blocks_used"] > 0
            resp.close()  # drop the connection mid-stream
    m = await server.wait_idle()
    assert m['energon_requests_total{door="http",outcome="aborted"}'] == before + prompts


@pytest.mark.parametrize(
    "body, param",
    [
        ({**BODY, "max_tokens": "8"}, "max_tokens"),
        ({**BODY, "max_tokens": 0}, "max_tokens"),
        ({**BODY, "max_tokens": 100_000}, "max_tokens"),
        ({**BODY, "temperature": "hot"}, "temperature"),
        ({**BODY, "prompt": 5}, "prompt"),
        ({**BODY, "prompt": ""}, "prompt"),
        ({**BODY, "prompt": [1, "a"]}, "prompt"),
        ({**BODY, "stream": "yes"}, "stream"),
        ({**BODY, "n": 0}, "n"),
        ({**BODY, "n": 65}, "n"),
        ({**BODY, "stop": [1]}, "stop"),
        ({**BODY, "prompt": [999]}, "prompt"),
        ({**BODY, "presence_penalty": -3}, "presence_penalty"),
        ({**BODY, "repetition_penalty": -1.1}, "repetition_penalty"),
        ({**BODY, "logit_bias": {"100000": 5}}, "logit_bias"),  # outside the vocabulary
        ({**BODY, "stop_token_ids": [100_000]}, "stop_token_ids"),
        ([1, 2], "body"),
    ],
)
async def test_wrong_values_get_400_naming_the_param(server, body, param):
    status, reply = await post(server, "/v1/completions", body)
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "messages",
    [None, [], ["hi"], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}]],
)
async def test_malformed_chat_messages_get_400(server, messages):
    body = {"model": "tiny", "messages": messages}
    status, reply = await post(server, "/v1/chat/completions", body)
    assert status == 400 and reply["error"]["param"] == "messages"


async def test_malformed_json_gets_400_and_the_server_keeps_serving(server):
    status, reply = await post(
        server, "/v1/completions", b'{"prompt": "x", ', headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, _ = await post(server, "/v1/completions", BODY)
    assert status == 200


async def test_oversize_body_gets_413(server):
    status, reply = await post(server, "/v1/completions", {**BODY, "prompt": "x" * (2 << 20)})
    assert status == 413 and "limit" in reply["error"]["message"]
    status, _ = await post(server, "/v1/completions", BODY)
    assert status == 200


async def test_unknown_model_gets_404_and_unknown_route_json_404(server):
    status, reply = await post(server, "/v1/completions", {**BODY, "model": "gpt-5"})
    assert status == 404 and "tiny" in reply["error"]["message"]
    status, reply = await post(server, "/v1/nothing", BODY)
    assert status == 404 and reply["error"]["message"]
