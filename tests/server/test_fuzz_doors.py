"""Fuzzing both doors of a served Engine: malformed JSON and msgpack, wrong types, huge and
negative numbers, odd Unicode, random bytes, truncated frames and HTTP messages, unknown keys.

For every example the door must answer the way its contract says (HTTP: a status below 500 with
an OpenAI error object, or a proper completion; ZeroMQ: exactly one final or 4xx error reply to
anything but a well-formed abort), nothing may be logged as an error or escape as an unhandled
exception, and right after it the server must still answer a valid greedy request with the
same text the Engine gives for it on its own. An example that gets no answer within
EXAMPLE_TIMEOUT seconds is a hang.

The Engine and both doors run in this process, so that an exception that escapes a handler or
a task is seen (logged errors, the loop's exception handler), not only a status code.
Hypothesis runs in a thread of its own and drives the sockets on the loop.

ENERGON_LONG=1 runs many more examples (the figures of docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import re
from dataclasses import dataclass, field

import aiohttp
import msgpack
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from aiohttp.http_exceptions import HttpProcessingError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from energon import Engine, SamplingParams
from energon.server.client import Client
from energon.server.frontend import Frontend, Limits
from energon.server.http_door import HttpDoor
from energon.server.messages import MAX_ID_CHARS
from energon.server.zmq_door import ZmqDoor

LONG = os.environ.get("ENERGON_LONG") == "1"
EXAMPLES = 2000 if LONG else 60
EXAMPLE_TIMEOUT = 30.0
LIMITS = Limits(max_request_bytes=16 << 10, max_tokens=16)
PROBE = "The probe"
PROBE_TOKENS = 4
pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(7200 if LONG else 300)]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# ------------------------------------------------------------------------------ the server


class Troubles(logging.Handler):
    """Every record logged at ERROR or above, and every exception the loop was told of; less
    aiohttp's own report of an HTTP message it could not parse (it answers those with a 4xx
    before any of Energon's code runs, and logs them at ERROR), which are only counted."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen: list[str] = []
        self.unparsable_http = 0

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and exc.code < 500:
            self.unparsable_http += 1
            return
        self.seen.append(f"{record.name}: {record.getMessage()} {record.exc_info or ''}")

    def on_loop(self, loop, context: dict) -> None:
        self.seen.append(f"loop: {context.get('message')} {context.get('exception')!r}")


@dataclass
class Served:
    engine: Engine
    frontend: Frontend
    http: str
    zmq: str
    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    client: Client
    reference: str  # the probe's greedy text, from the Engine alone
    troubles: Troubles
    counts: dict = field(default_factory=dict)

    def run(self, coro, what: str):
        """Runs coro on the server's loop from hypothesis's thread; a hang fails the example."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(EXAMPLE_TIMEOUT)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise AssertionError(f"hang: {what} got no answer in {EXAMPLE_TIMEOUT} s") from None

    async def probe(self) -> None:
        """Both doors still serve: a greedy request gets the Engine's own text."""
        body = {"prompt": PROBE, "max_tokens": PROBE_TOKENS, "temperature": 0}
        async with self.session.post(self.http + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["choices"][0]["text"] == self.reference
        done = await self.client.infer(PROBE, greedy())
        assert done.text == self.reference

    def check_quiet(self) -> None:
        assert self.troubles.seen == [], self.troubles.seen

    def fresh(self) -> Served:
        """Forget what an earlier test saw (each test reports its own troubles)."""
        self.troubles.seen.clear()
        self.counts = {}
        return self


def greedy() -> SamplingParams:
    return SamplingParams(max_tokens=PROBE_TOKENS, temperature=0.0)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served():
    loop = asyncio.get_running_loop()
    engine = await Engine("tiny", device="cpu", progress=False).start()
    troubles = Troubles()
    logging.getLogger().addHandler(troubles)
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(troubles.on_loop)
    frontend = Frontend(engine, limits=LIMITS)
    http, zmq_door = HttpDoor(frontend, "127.0.0.1", 0), ZmqDoor(frontend, "tcp://127.0.0.1:*")
    try:
        reference = (await engine.infer(PROBE, greedy())).text
        srv = Served(
            engine,
            frontend,
            await http.start(),
            await zmq_door.start(),
            loop,
            aiohttp.ClientSession(),
            Client(zmq_door.endpoint),
            reference,
            troubles,
        )
        await srv.probe()
        yield srv
        await srv.client.close()
        await srv.session.close()
    finally:
        await zmq_door.close()
        await http.close()
        await engine.shutdown()
        loop.set_exception_handler(previous_handler)
        logging.getLogger().removeHandler(troubles)


async def settled(srv: Served) -> None:
    """After the examples: nothing in flight, every KV block free, nothing went wrong."""
    for _ in range(200):  # the last handlers finish a moment after their replies went out
        if srv.frontend.in_flight == 0 and srv.engine.stats()["requests"] == 0:
            break
        await asyncio.sleep(0.05)
    blocks = srv.engine.scheduler.blocks
    assert srv.frontend.in_flight == 0 and srv.engine.stats()["requests"] == 0
    assert blocks.num_free_blocks == blocks.num_blocks
    await srv.probe()
    srv.check_quiet()


# ------------------------------------------------------------------------------ strategies

huge_ints = st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(2**63), -1, 0])
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | huge_ints
    | st.floats()  # NaN and ±Infinity too: Python's json reads and writes them
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
short_text = st.text(min_size=1, max_size=16)
odd_text = st.sampled_from(
    ["", "\ud800", "a\udfff", "\x00", "\u202e\u0301", "🦄" * 5, "\uffff", "x" * 3000, "8", "NaN"]
) | st.text(alphabet=st.characters(codec=None), max_size=12)  # surrogates included
wild_numbers = st.one_of(huge_ints, huge_ints, st.integers(), st.floats(), odd_text, json_values)
token_ids = st.lists(st.integers(0, 259), min_size=1, max_size=6)
wild_ids = st.lists(st.integers(-5, 300) | huge_ints | json_scalars, max_size=6)

# One valid value per field, and the wild ones that replace it in some examples.
SAMPLING = {
    "max_tokens": (st.integers(1, 12), wild_numbers),
    "temperature": (
        st.sampled_from([0, 0.0, 0.7, 1, 2.0]),
        st.sampled_from([1e-300, 1e300]) | wild_numbers,
    ),  # fmt: skip
    "top_p": (st.floats(0.05, 1.0), wild_numbers),
    "top_k": (st.integers(0, 300), wild_numbers),
    "seed": (st.integers(0, 2**63 - 1), wild_numbers),
    "stop": (
        short_text | st.lists(short_text, max_size=3),
        st.lists(odd_text, max_size=20) | odd_text | json_values,
    ),  # fmt: skip
    "ignore_eos": (st.booleans(), json_values),
}
COMPLETION = {
    "model": (st.just("tiny"), st.sampled_from(["other", ""]) | json_values),
    "prompt": (
        short_text | token_ids | st.lists(short_text, min_size=1, max_size=3),
        odd_text | wild_ids | st.lists(odd_text | wild_ids, max_size=70) | json_values,
    ),  # fmt: skip
    "stream": (st.booleans(), json_values),
    **SAMPLING,
}
roles = st.sampled_from(["user", "system", "assistant", "tool", "developer"])
good_messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": short_text}), min_size=1, max_size=3
)
text_parts = st.lists(
    st.fixed_dictionaries({"type": st.just("text"), "text": odd_text}), max_size=3
)
wild_message = st.fixed_dictionaries(
    {}, optional={"role": roles | json_values, "content": odd_text | text_parts | json_values}
)
CHAT = {
    **{k: v for k, v in COMPLETION.items() if k != "prompt"},
    "messages": (good_messages, st.lists(wild_message, max_size=4) | json_values),
    "max_completion_tokens": (st.integers(1, 12), wild_numbers),
}
EXTRAS = ["n", "logprobs", "echo", "suffix", "best_of", "presence_penalty", "frequency_penalty"]
EXTRAS += ["logit_bias", "stream_options", "top_logprobs", "tools", "response_format", "zz"]
EXTRAS += ["stop_token_ids", "repetition_penalty", "min_tokens", "min_p"]


@st.composite
def request_body(draw, fields: dict, required: tuple = (), extras: list[str] = EXTRAS):
    """A valid body (the `required` fields and some of the others), then up to two fields given
    wild values and up to two extra fields (unsupported or unknown ones) with any value."""
    body = {name: draw(good) for name, (good, _) in fields.items() if name in required or draw(st.booleans())}  # fmt: skip
    for name in draw(st.sets(st.sampled_from(sorted(fields)), max_size=2)):
        body[name] = draw(fields[name][1])
    for name in draw(st.sets(st.sampled_from(extras), max_size=2 if draw(st.booleans()) else 0)):
        body[name] = draw(st.sampled_from([None, 0, 1, False, True, {"include_usage": True}]) | json_values)  # fmt: skip
    return body


def json_bytes(value, ascii_only: bool) -> bytes:
    text = json.dumps(value, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")  # lone surrogates as the (invalid) bytes


@st.composite
def mutated_bytes(draw, valid: bytes):
    """valid with a few bytes flipped, cut, or inserted."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[draw(st.integers(0, len(data))) :]
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


VALID_HTTP = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 3, "temperature": 0})
wild_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(json_bytes, json_values, st.booleans()),
    mutated_bytes(VALID_HTTP.encode()),
    st.sampled_from([b"", b"{}", b"null", b"[]", b"{" * 5000, b'{"prompt": "' + b"y" * 20000 + b'"}']),
)  # fmt: skip
OTHER_ROUTES = ["/v1/models", "/health", "/metrics", "/v1/nothing", "/v1/completions/", "//v1/x"]
content_types = st.sampled_from(
    ["application/json"] * 4
    + ["application/json; charset=latin-1", "text/plain", "", "multipart/form-data; boundary=x"]
)


# ------------------------------------------------------------------------------ HTTP door


@st.composite
def http_requests(draw):
    """(method, route, body, content type): mostly a POST to one of the two generation routes
    with a body for it (valid but for a few wild fields), sometimes anything."""
    if draw(st.sampled_from([False] * 9 + [True])):
        route = draw(st.sampled_from(OTHER_ROUTES))
    else:
        route = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    method = draw(st.sampled_from(["POST"] * 9 + ["GET", "PUT"]))
    if draw(st.sampled_from([True] * 3 + [False])):
        fields, required = (CHAT, "messages") if "chat" in route else (COMPLETION, "prompt")
        body = draw(st.builds(json_bytes, request_body(fields, (required,)), st.booleans()))
    else:
        body = draw(wild_bodies)
    return method, route, body, draw(content_types)


def check_http_answer(status: int, content_type: str, data: bytes) -> None:
    """The door's contract for any request: no 5xx; an error is an OpenAI error object; a 200 is
    a completion, or a stream of JSON events ending in [DONE]."""
    assert status < 500, (status, data[:500])
    if status >= 400:
        error = json.loads(data)["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert {"type", "param", "code"} <= set(error)
    elif content_type == "text/event-stream":
        events = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
        assert events and events[-1] == b"[DONE]", data[-300:]
        for event in events[:-1]:
            parsed = json.loads(event)
            assert parsed.get("error", {}).get("type") != "server_error", parsed
    elif content_type == "application/json":
        assert isinstance(json.loads(data), dict)


async def http_exchange(srv: Served, method: str, route: str, body: bytes, ctype: str):
    headers = {"Content-Type": ctype} if ctype else {}
    async with srv.session.request(method, srv.http + route, data=body, headers=headers) as resp:
        data = await resp.read()
        check_http_answer(resp.status, resp.content_type, data)
        srv.counts[resp.status] = srv.counts.get(resp.status, 0) + 1
    await srv.probe()


async def test_fuzzed_http_requests_get_4xx_or_answers_and_the_door_keeps_serving(served):
    served.fresh()

    @FUZZ
    @given(http_requests())
    def example(request):
        method, route, body, ctype = request
        served.run(http_exchange(served, method, route, body, ctype), f"{method} {route}")
        served.check_quiet()

    await asyncio.to_thread(example)
    await settled(served)
    print(f"http door: statuses {dict(sorted(served.counts.items()))}")


HTTP_HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\n"
CLOSE = b"Connection: close\r\n"
RAW_REQUESTS = [
    HTTP_HEAD + CLOSE + b"Content-Length: %d\r\n\r\n%s" % (len(VALID_HTTP), VALID_HTTP.encode()),
    HTTP_HEAD + CLOSE + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(VALID_HTTP), VALID_HTTP.encode()),
    b"GET /health HTTP/1.1\r\nHost: fuzz\r\n\r\n" + b"GET /v1/models HTTP/1.1\r\nHost: fuzz\r\n" + CLOSE + b"\r\n",
]  # fmt: skip
raw_http = st.one_of(
    st.binary(min_size=1, max_size=300),
    st.sampled_from(RAW_REQUESTS).flatmap(mutated_bytes),
    st.sampled_from(RAW_REQUESTS).flatmap(mutated_bytes),
    st.sampled_from(RAW_REQUESTS).map(lambda r: r.replace(b"Length: ", b"Length: 9")),
    st.sampled_from(RAW_REQUESTS),
)
IDLE = 0.3  # seconds of silence after which a connection is taken to wait for more input


async def raw_http_exchange(srv: Served, data: bytes) -> list[int]:
    """Sends data on a fresh connection and reads what comes back until the server closes it or
    falls silent for IDLE seconds (it may rightly wait for the rest of a cut message; a closed
    half would read as a client gone); returns the status of every response that came."""
    host, port = srv.http.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    answer = b""
    try:
        writer.write(data)
        await writer.drain()
        while part := await asyncio.wait_for(reader.read(1 << 16), IDLE):
            answer += part
    except (ConnectionError, asyncio.TimeoutError):
        pass  # the server hung up on garbage, or waits for more: both are answers
    finally:
        writer.close()
    statuses = [int(s) for s in re.findall(rb"HTTP/1\.[01] (\d{3}) ", answer)]
    assert all(s < 500 for s in statuses), answer[:500]
    if data in RAW_REQUESTS:  # the unmutated ones: every request in them is answered
        assert len(statuses) == data.count(b" HTTP/1.1\r\n") and set(statuses) == {200}, answer
    await srv.probe()
    return statuses


async def test_fuzzed_raw_http_messages_never_get_5xx_or_hang_the_door(served):
    served.fresh()
    statuses: dict[int, int] = {}

    @FUZZ
    @given(raw_http)
    def example(data):
        for s in served.run(raw_http_exchange(served, data), "a raw HTTP message"):
            statuses[s] = statuses.get(s, 0) + 1
        served.check_quiet()

    await asyncio.to_thread(example)
    await settled(served)
    unparsable = served.troubles.unparsable_http
    print(f"http door, raw: statuses {dict(sorted(statuses.items()))}, unparsable {unparsable}")


# What the fuzzing above found (each was a 500, and a top_k beyond int64 failed the Engine's
# step: with more than one worker, that fails the whole Engine), kept as plain examples.
FOUND = [
    ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}, "prompt"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "\udc00"}], "max_tokens": 1},
        "prompt",
    ),
    ("/v1/completions", {"prompt": "hi", "top_k": 10**30}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**64 - 1, "stream": True}, "top_k"),
]


@pytest.mark.parametrize("route, body, param", FOUND, ids=["surrogate", "chat", "k10e30", "k2e64"])
async def test_what_fuzzing_found_is_a_400_naming_the_field(served, route, body, param):
    served.fresh()
    data = json.dumps(body).encode()  # ASCII: the surrogates travel as \ud800 escapes
    headers = {"Content-Type": "application/json"}
    async with served.session.post(served.http + route, data=data, headers=headers) as resp:
        assert resp.status == 400, await resp.text()
        assert (await resp.json())["error"]["param"] == param
    msg = {"v": 1, "id": 1, "prompt": "hi", "params": {"top_k": 2**64 - 1}}
    replies = await FuzzPeer(served).exchange_once([msgpack.packb(msg)])
    assert [(r["type"], r["status"], r["field"]) for r in replies] == [("error", 400, "top_k")]
    await served.probe()
    served.check_quiet()


# ------------------------------------------------------------------------------ ZeroMQ door

msgpack_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
msgpack_values = st.recursive(
    msgpack_scalars | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _pack(value) -> bytes:
    return msgpack.packb(value, unicode_errors="surrogatepass")  # lone surrogates: bad UTF-8


def packable(value) -> bool:
    try:
        _pack(value)
        return True
    except (OverflowError, TypeError, ValueError):  # ints beyond 64 bits
        return False


ZMQ_PARAMS = {
    **SAMPLING,
    "stop_token_ids": (st.lists(st.integers(0, 259), max_size=3), wild_ids),
    "logprobs": (st.integers(0, 20), wild_numbers),
}
ZMQ_FIELDS = {
    "v": (st.just(1), st.sampled_from([2, "1", None, 1.0]) | msgpack_values),
    "type": (st.just("generate"), st.sampled_from(["abort", "delta", "final", ""]) | msgpack_values),
    "id": (st.integers(0, 2**32) | st.text(min_size=1, max_size=8), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=MAX_ID_CHARS + 2) | msgpack_values),
    "prompt": (short_text, odd_text | msgpack_values),
    "token_ids": (token_ids, wild_ids | msgpack_values),
    "params": (request_body(ZMQ_PARAMS, (), ["n", "best_of", "zz"]), msgpack_values),
    "stream": (st.booleans(), msgpack_values),
    "key": (short_text, msgpack_values),
}  # fmt: skip


@st.composite
def zmq_request(draw):
    """A generate or abort message, valid but for a few wild fields (prompt and token_ids may
    both be there, or neither)."""
    fields = dict(ZMQ_FIELDS)
    prompt = draw(st.sampled_from(["prompt", "token_ids"]))
    del fields["token_ids" if prompt == "prompt" else "prompt"]
    msg = draw(request_body(fields, ("id", prompt), ["prompt", "token_ids", "zz"]).filter(packable))
    if draw(st.sampled_from([False] * 9 + [True])):
        msg["type"] = "abort"
    return [_pack(msg)]


VALID_ZMQ = _pack(
    {"v": 1, "type": "generate", "id": 9, "prompt": "hi", "params": {"max_tokens": 3}}
)
zmq_frames = st.one_of(
    st.lists(st.binary(max_size=100), min_size=1, max_size=3),
    st.lists(st.builds(_pack, msgpack_values), min_size=1, max_size=2),
    mutated_bytes(VALID_ZMQ).map(lambda b: [b]),
    st.sampled_from([[b""], [VALID_ZMQ, b""], [b"\xc1"], [b"\x81" * 2000], [b"\xdf\xff\xff\xff\xff"]]),
)  # fmt: skip
zmq_messages = st.sampled_from([zmq_request()] * 3 + [zmq_frames]).flatmap(lambda s: s)


def is_abort(frames: list[bytes]) -> bool:
    """A well-formed abort (the one message the door does not answer): one frame, a msgpack map
    with string keys, version 1 (or none), type 'abort' and a valid id."""
    if len(frames) != 1:
        return False
    try:
        msg = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception:  # not msgpack: answered with an error
        return False
    if not isinstance(msg, dict) or msg.get("type") != "abort" or msg.get("v", 1) != 1:
        return False
    rid = msg.get("id")
    return (type(rid) is int) or (type(rid) is str and 0 < len(rid) <= MAX_ID_CHARS)


class FuzzPeer:
    """One DEALER that sends fuzzed messages and reads every reply the door sends it."""

    def __init__(self, srv: Served):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(srv.zmq)

    async def exchange(self, frames: list[bytes]) -> list[dict]:
        """Sends frames; returns the replies up to the terminal one (none for an abort)."""
        stray = await self.sock.poll(0)
        assert not stray, "a reply arrived after the previous message's terminal reply"
        await self.sock.send_multipart(frames)
        if is_abort(frames):
            return []
        replies = []
        while not replies or replies[-1]["type"] not in ("final", "error"):
            replies.append(msgpack.unpackb(await self.sock.recv(), raw=False))
        return replies

    async def exchange_once(self, frames: list[bytes]) -> list[dict]:
        try:
            return await asyncio.wait_for(self.exchange(frames), EXAMPLE_TIMEOUT)
        finally:
            self.close()

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def check_zmq_replies(frames: list[bytes], replies: list[dict]) -> None:
    for reply in replies[:-1]:
        assert reply["type"] == "delta", replies
    if replies and replies[-1]["type"] == "error":
        assert 400 <= replies[-1]["status"] < 500, replies[-1]
        assert replies[-1]["message"], replies[-1]
    elif replies:  # a fuzzed message that was a valid request: it ran to its end
        assert replies[-1]["finish_reason"] in ("stop", "length"), replies[-1]


async def zmq_exchange(srv: Served, peer: FuzzPeer, frames: list[bytes], counts: dict) -> None:
    replies = await peer.exchange(frames)
    check_zmq_replies(frames, replies)
    if not replies:
        what = "none (abort)"
    elif replies[-1]["type"] == "error":
        what = f"{replies[-1]['status']} {replies[-1]['field']}"
    else:
        what = f"final {replies[-1]['finish_reason']}"
    counts[what] = counts.get(what, 0) + 1
    await srv.probe()


async def zmq_garbage_connection(srv: Served, data: bytes) -> None:
    """Bytes that are not ZMTP, straight onto the door's TCP port."""
    host, port = srv.zmq.removeprefix("tcp://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)
    except (ConnectionError, asyncio.TimeoutError):
        pass  # libzmq may hang up at once, or wait for more: both are fine, we close
    finally:
        writer.close()
    await srv.probe()


async def test_fuzzed_zmq_messages_get_one_4xx_error_or_answer_each(served):
    served.fresh()
    peer = FuzzPeer(served)
    counts: dict[str, int] = {}

    @FUZZ
    @given(zmq_messages | st.binary(min_size=1, max_size=64).map(lambda b: ("tcp", b)))
    def example(frames):
        if isinstance(frames, tuple):
            served.run(zmq_garbage_connection(served, frames[1]), "garbage on the TCP port")
            counts["tcp garbage"] = counts.get("tcp garbage", 0) + 1
        else:
            served.run(zmq_exchange(served, peer, frames, counts), "a ZeroMQ message")
        served.check_quiet()

    try:
        await asyncio.to_thread(example)
        # nothing more comes for what was sent: a last request gets only its own answer
        last = [_pack({"v": 1, "id": "last", "prompt": "end", "params": {"max_tokens": 2}})]
        replies = await peer.exchange(last)
        assert [r["id"] for r in replies] == ["last"] * len(replies)
    finally:
        peer.close()
    await settled(served)
    print(f"zmq door: replies {dict(sorted(counts.items()))}")
