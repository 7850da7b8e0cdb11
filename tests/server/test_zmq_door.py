"""The ZeroMQ door, through energon.Client and through a raw DEALER socket."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq
import zmq.asyncio

from energon import InvalidRequest, SamplingParams
from energon.server.client import Client
from energon.server.messages import TooLarge

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


async def test_infer_returns_text_ids_and_usage(server):
    async with Client(server.zmq) as client:
        done = await client.infer("Hello", GREEDY)
    assert done.finish_reason in ("length", "stop")
    assert len(done.token_ids) == done.usage.completion_tokens <= 8
    assert done.usage.prompt_tokens == len(b"Hello")  # the byte tokenizer: one id per byte
    assert done.text == bytes(t for t in done.token_ids if t < 256).decode("utf-8", "replace")


async def test_stream_concatenates_to_the_same_completion(server):
    async with Client(server.zmq) as client:
        whole = await client.infer("Hello", GREEDY)
        pieces = [p async for p in client.stream("Hello", GREEDY)]
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1].finish_reason == whole.finish_reason
    assert "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids


async def test_logprobs_and_timings_come_through_infer_and_stream(server):
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=2)
    async with Client(server.zmq) as client:
        whole = await client.infer("Hello", params)
        pieces = [p async for p in client.stream("Hello", params)]
    assert [lp.token_id for lp in whole.logprobs] == whole.token_ids
    assert all(lp.top[0] == (lp.token_id, lp.logprob) and len(lp.top) == 2 for lp in whole.logprobs)
    assert [lp for p in pieces for lp in p.logprobs] == whole.logprobs
    for done in (whole.timings, pieces[-1].timings):
        assert 0 <= done.queued_s <= done.first_token_s and done.per_output_token_s > 0
    assert [p.timings for p in pieces[:-1]] == [None] * (len(pieces) - 1)


async def test_prompt_logprobs_come_with_the_final_reply(server):
    """A prompt's logprob rows through the door: the first None, then each token's; the rows of
    "Hello" + the token generated after it end with that token's logprob as it was generated."""
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=1, prompt_logprobs=1)
    async with Client(server.zmq) as client:
        first = await client.infer("Hello", params)
        again = await client.infer(list(b"Hello") + first.token_ids, params)
        streamed = [p async for p in client.stream("Hello", params)]
        plain = await client.infer("Hello", GREEDY)
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == 5
    assert [r.token_id for r in first.prompt_logprobs[1:]] == list(b"ello")
    assert again.prompt_logprobs[:5] == first.prompt_logprobs
    assert again.prompt_logprobs[5].token_id == first.logprobs[0].token_id
    assert again.prompt_logprobs[5].logprob == pytest.approx(first.logprobs[0].logprob, abs=1e-4)
    assert plain.prompt_logprobs is None
    assert streamed[-1].finish_reason is not None


async def test_logit_bias_and_penalties_travel_as_params(server):
    biased = SamplingParams(max_tokens=4, temperature=0.0, logit_bias={ord("q"): 100.0})
    rules = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
    async with Client(server.zmq) as client:
        qs = await client.infer("Hello", biased)
        free = await client.infer("Hello", SamplingParams(**rules))
        penalised = await client.infer("Hello", SamplingParams(frequency_penalty=2.0, **rules))
    assert qs.text == "qqqq"
    assert len(set(penalised.token_ids)) > len(set(free.token_ids))


async def test_token_id_prompt_equals_text_prompt(server):
    async with Client(server.zmq) as client:
        by_text = await client.infer("Hi!", GREEDY)
        by_ids = await client.infer(list(b"Hi!"), GREEDY)
    assert by_ids.token_ids == by_text.token_ids


async def test_replies_come_out_of_order_on_one_client(server):
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=1, temperature=0.0)
    order = []
    async with Client(server.zmq) as client:

        async def run(name, params):
            await client.infer("abc", params)
            order.append(name)

        await asyncio.gather(run("long", long), *(run(f"short{i}", short) for i in range(5)))
    assert order[-1] == "long"  # sent first, answered last
    assert sorted(order[:-1]) == [f"short{i}" for i in range(5)]


async def test_many_clients_at_once(server):
    clients = [Client(server.zmq) for _ in range(8)]
    try:
        results = await asyncio.gather(
            *(c.infer(f"prompt {i}", GREEDY) for i, c in enumerate(clients))
        )
        solo = await clients[0].infer("prompt 3", GREEDY)
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert results[3].token_ids == solo.token_ids


async def test_closing_a_stream_aborts_it_and_frees_its_blocks(server):
    params = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
    async with Client(server.zmq) as client:
        stream = client.stream("a long one", params)
        async for _ in stream:
            break
        assert (await server.metrics())["energon_kv_blocks_used"] > 0
        await stream.aclose()
        m = await server.wait_idle()
    assert m['energon_requests_total{door="zmq",outcome="aborted"}'] >= 1


async def test_a_client_that_disconnects_mid_stream_is_aborted(server):
    params = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(server.zmq)
    msg = {"id": 1, "prompt": "bye", "params": {"max_tokens": 1500, "ignore_eos": True}}
    await sock.send(msgpack.packb({**msg, "stream": True}))
    first = msgpack.unpackb(await sock.recv())
    assert first["type"] == "delta"
    sock.close(linger=0)  # gone without a word
    ctx.term()
    await server.wait_idle()
    del params


async def test_invalid_params_are_an_error_reply_naming_the_field(server):
    async with Client(server.zmq) as client:
        with pytest.raises(InvalidRequest) as info:
            await client.infer("x", SamplingParams(max_tokens=100_000))
        assert info.value.field == "max_tokens"
        assert "4096" in str(info.value)
        assert (await client.infer("still serving", GREEDY)).token_ids


@pytest.fixture
async def raw(server):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(server.zmq)
    yield sock
    sock.close(linger=0)
    ctx.term()


async def ask(sock, payload: bytes) -> dict:
    await sock.send(payload)
    return msgpack.unpackb(await asyncio.wait_for(sock.recv(), 10))


async def test_malformed_msgpack_gets_an_error_reply(raw):
    reply = await ask(raw, b"\xc1 not msgpack")
    assert reply["type"] == "error" and reply["status"] == 400 and reply["id"] is None
    assert "msgpack" in reply["message"]


@pytest.mark.parametrize(
    "message, field",
    [
        ([1, 2, 3], "message"),
        ({"id": 1.5, "prompt": "x"}, "id"),
        ({"id": 1, "prompt": 42}, "prompt"),
        ({"id": 1, "token_ids": ["a"]}, "token_ids"),
        ({"id": 1, "prompt": "x", "token_ids": [1]}, "prompt"),
        ({"id": 1, "prompt": "x", "params": {"max_tokens": "8"}}, "max_tokens"),
        ({"id": 1, "prompt": "x", "params": {"temprature": 0}}, "params"),
        ({"id": 1, "prompt": "x", "stream": "yes"}, "stream"),
        ({"id": 1, "type": "dance"}, "type"),
        ({"id": 1, "token_ids": [999]}, "prompt"),
    ],
)
async def test_wrong_types_get_an_error_reply_naming_the_field(raw, message, field):
    reply = await ask(raw, msgpack.packb(message))
    assert reply["type"] == "error" and reply["status"] == 400, reply
    assert reply["field"] == field and reply["message"]
    if isinstance(message, dict) and isinstance(message.get("id"), int):
        assert reply["id"] == message["id"]


async def test_oversize_message_is_refused_and_the_server_keeps_serving(raw, server):
    reply = await ask(raw, msgpack.packb({"id": 1, "prompt": "x" * (2 << 20)}))
    assert (reply["status"], reply["kind"]) == (413, "too_large")
    assert "limit" in reply["message"]
    async with Client(server.zmq) as client:
        with pytest.raises(TooLarge):
            await client.infer("y" * (2 << 20), GREEDY)
        assert (await client.infer("ok", GREEDY)).token_ids
    m = await server.metrics()
    assert m['energon_requests_total{door="zmq",outcome="too_large"}'] >= 2
