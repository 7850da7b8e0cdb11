"""Fuzzing the live wire between a controller and its worker: garbled, forged and mutated messages
reach a running worker's two channels and the controller's socket; neither side crashes or hangs,
each counts exactly the messages it could not use, and both keep serving real calls.

Hypothesis runs in a thread of its own while the group lives on the test's event loop, so the
loop keeps heartbeating and every example can wait, with a bound, for real calls to come back: an
example whose calls do not return in EXAMPLE_TIMEOUT seconds is a hang and fails the test.

What each side should do with a message is told by `protocol.decode` on a copy of its bytes (the
wire's own definition of a well-formed message) and by the handling rules of DESIGN.md §4: a
malformed message is counted `invalid` (a malformed call is also answered with an error), a
well-formed one of a kind the receiving side does not take is counted `dropped`.

ENERGON_LONG=1 runs many more examples (the figures of docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from energon.actors import ActorGroup, protocol, transport
from energon.actors.worker import STATS_METHOD
from energon.errors import ProtocolError

from .conftest import eventually
from .sample_actors import Echo

LONG = os.environ.get("ENERGON_LONG") == "1"
EXAMPLES = 4000 if LONG else 150
EXAMPLE_TIMEOUT = 20.0  # seconds for one example's real calls to come back
pytestmark = pytest.mark.timeout(3600 if LONG else 180)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)

# Ids of forged messages: far above any id the controller hands out, with every byte set, so
# that no mutation of a single byte brings one down to the id of a real call in flight.
FORGED_BASE = 0x5A5A_5A5A_5A5A_0000
# Methods a forged call may name: each answers at once (or fails at once) and holds nothing.
METHODS = [
    "echo",
    "ping",
    "boom",
    "aboom",
    "init_args",
    "no_such_method",
    "_private",
    "",
    STATS_METHOD,
]
LAST_KINDS = {"shutdown", "init"}  # well-formed, they end or rebuild the actor: never forged

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
payload_specs = st.builds(
    lambda code, spec: msgpack.ExtType(code, msgpack.packb(spec)),
    st.integers(0, 6),
    st.dictionaries(
        st.sampled_from(["dtype", "shape", "frame", "seg", "off", "nbytes"]),
        scalars
        | st.sampled_from(["float32", "int8", "bfloat16", "<f4", "|O", "V0"])
        | st.lists(st.integers(-2, 2**40), max_size=3),
        max_size=6,
    ),
)
plain_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
values = st.recursive(
    scalars | payload_specs,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)  # fmt: skip
good_ids = st.integers(FORGED_BASE, FORGED_BASE + 2**16)
# A cancel for an id that has not arrived yet makes the worker drop that call when it comes (as
# it should): forged cancels name ids no forged call uses, so every forged call is answered.
cancel_ids = st.integers(FORGED_BASE + 2**20, FORGED_BASE + 2**20 + 2**16)
WILD_HEADER = {
    "v": st.sampled_from([2, "1", None, 1.0, True, 0]) | values,
    # never a valid id: one could name a real call (and a cancel of it would drop it)
    "id": st.integers(-(2**63), -1)
    | st.integers(2**63, 2**64 - 1)
    | st.sampled_from([1.5, True, None, "7", b"7", [7]]),
    "kind": st.sampled_from(["zap", "", "CALL"]) | values,
    "method": st.integers(0, 3) | values,
    "meta": values,
}
GOOD = {
    int: st.integers(0, 2**31),
    float: st.floats(0, 10),
    str: st.text(max_size=8),
    bool: st.booleans(),
    list: st.lists(plain_values, max_size=3),
    dict: st.dictionaries(st.text(max_size=4), plain_values, max_size=3),
    type(None): st.none(),
    object: plain_values,
}


def good_value(typ):
    """A value of the type META_SCHEMA asks for (any of them, for a tuple of types)."""
    return st.one_of([GOOD[t] for t in (typ if isinstance(typ, tuple) else (typ,))])


@st.composite
def structured(draw, kinds: list[str]):
    """A well-formed header of one of `kinds` (meta as META_SCHEMA asks), then up to two of its
    fields and up to two meta keys given wild values or removed, and sometimes payload frames
    it does not name."""
    kind = draw(st.sampled_from(kinds))
    meta = {key: draw(good_value(typ)) for key, typ in protocol.META_SCHEMA[kind].items()}
    method = draw(st.sampled_from(METHODS)) if kind == "call" else None
    msg_id = draw(cancel_ids if kind == "cancel" else good_ids)
    header = {"v": protocol.VERSION, "id": msg_id, "kind": kind, "method": method, "meta": meta}
    for key in draw(st.sets(st.sampled_from(sorted(meta) + ["x"]), max_size=2)):
        if draw(st.booleans()):
            meta[key] = draw(values)
        else:
            meta.pop(key, None)
    for key in draw(st.sets(st.sampled_from(sorted(WILD_HEADER)), max_size=2)):
        if draw(st.booleans()):
            header[key] = draw(WILD_HEADER[key])
        else:
            del header[key]
    extra = draw(st.sampled_from([False] * 3 + [True]))
    payloads = draw(st.lists(st.binary(max_size=48), max_size=3)) if extra else []
    return [msgpack.packb(header), *payloads]


def _valid_call(msg_id: int, which: int) -> list:
    """A well-formed call carrying payload frames of each kind (tensor, ndarray, large bytes)."""
    args = [
        torch.arange(6, dtype=torch.int16).reshape(2, 3),
        np.linspace(0, 1, 5, dtype=np.float32),
        b"\x07" * 70_000,  # large bytes travel as their own frame
        {"k": [1, "two", None]},
    ]
    frames = protocol.encode_call(msg_id, "echo", (args[which % len(args)],), {"n": which})
    return [bytes(memoryview(f).cast("B")) for f in frames]


@st.composite
def mutated(draw):
    """A well-formed call, then up to four mutations: a byte flipped, a frame cut short,
    dropped, repeated, or a stray frame added."""
    frames = [bytearray(f) for f in _valid_call(draw(st.integers(FORGED_BASE, FORGED_BASE + 99)), draw(st.integers(0, 3)))]  # fmt: skip
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(0, len(frames) - 1))
        action = draw(st.sampled_from(["flip", "cut", "drop", "repeat", "stray"]))
        if action == "flip" and frames[k]:
            i = draw(st.integers(0, min(len(frames[k]), 256) - 1))
            frames[k][i] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del frames[k][draw(st.integers(0, len(frames[k]))) :]
        elif action == "drop" and len(frames) > 1:
            del frames[k]
        elif action == "repeat":
            frames.insert(k, bytearray(frames[k]))
        elif action == "stray":
            frames.append(bytearray(draw(st.binary(max_size=16))))
    return [bytes(f) for f in frames]


def messages(kinds: list[str]):
    """Any message: random bytes, a structured header, or a mutated real call (never empty)."""
    return st.sampled_from(["bytes", "structured", "structured", "structured", "mutated"]).flatmap(
        lambda how: {
            "bytes": st.lists(st.binary(max_size=64), min_size=1, max_size=3),
            "structured": structured(kinds),
            "mutated": mutated(),
        }[how]
    )


def judge(frames: list) -> tuple[protocol.Message | None, ProtocolError | None]:
    """What the wire makes of frames: (the message, None) or (None, the error)."""
    try:
        return protocol.decode([bytes(f) for f in frames], protocol.Limits()), None
    except ProtocolError as exc:
        return None, exc


class OnLoop:
    """Runs coroutines on the test's loop from hypothesis's thread; a coroutine that does not
    finish within EXAMPLE_TIMEOUT seconds is a hang."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    def __call__(self, coro, what: str):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(EXAMPLE_TIMEOUT)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise AssertionError(f"hang: {what} did not finish in {EXAMPLE_TIMEOUT} s") from None


async def serving(group: ActorGroup, n: int) -> None:
    """Both of worker 0's channels answer a real call (sync: echo, io: aecho)."""
    assert await group[0].call("echo", n) == n
    assert await group[0].call("aecho", [n]) == [n]


# --------------------------------------------------------------------------- to the worker


async def test_worker_counts_every_garbled_message_on_both_channels_and_keeps_serving():
    loop = asyncio.get_running_loop()
    # hypothesis runs in a thread here, so the loop keeps heartbeating: the default timeout holds
    async with await ActorGroup.spawn(Echo, 1) as group:
        on_loop = OnLoop(loop)
        pid = await group[0].call("pid")
        before, ctl_before = await group[0].call(STATS_METHOD), group.stats()
        expect = {"invalid": 0, "dropped": 0, "answered": 0, "examples": 0}

        async def send_then_serve(frames, channel, n):
            transport.send(group._sock, [protocol.identity(0, channel), *frames])
            group._reader.kick()
            await serving(group, n)

        @FUZZ
        @given(
            messages(["call"] * 4 + sorted(protocol.KINDS - LAST_KINDS)),
            st.sampled_from(["io", "sync"]),
        )
        def example(frames, channel):
            msg, err = judge(frames)
            assume(msg is None or msg.kind not in LAST_KINDS)
            if err is not None:
                expect["invalid"] += 1
                # a call (or, on sync, an init) whose header was readable is answered with an error
                answer = ("call",) if channel == "io" else ("call", "init")
                expect["answered"] += getattr(err, "kind", None) in answer
            elif msg.kind == "call":
                expect["answered"] += 1
            elif msg.kind not in ({"heartbeat", "cancel"} if channel == "io" else set()):
                expect["dropped"] += 1
            expect["examples"] += 1
            on_loop(send_then_serve(frames, channel, expect["examples"]), "a real call")

        await asyncio.to_thread(example)

        after = await group[0].call(STATS_METHOD)
        assert after["invalid"] - before["invalid"] == expect["invalid"]
        assert after["dropped"] - before["dropped"] == expect["dropped"]
        # every answer to a forged message reached the controller as a well-formed late reply
        answered = ctl_before["late_replies"] + expect["answered"]
        assert await eventually(lambda: group.stats()["late_replies"] >= answered, 10)
        ctl = group.stats()
        assert ctl["late_replies"] == answered and ctl["invalid"] == ctl_before["invalid"]
        assert ctl["in_flight"] == 0 and group.failure is None and group.is_alive(0)
        assert await group[0].call("pid") == pid  # the same process served throughout
    print(f"live wire, worker: {expect}")


# ----------------------------------------------------------------------- to the controller


async def test_controller_counts_garbage_from_strangers_and_from_worker_identities():
    loop = asyncio.get_running_loop()
    async with await ActorGroup.spawn(Echo, 1) as group:
        on_loop = OnLoop(loop)
        # Strangers: DEALERs whose identities name no worker of this group.
        strangers = {}
        for ident in (b"stranger", b"7", b"1.sync", b"0.io", b"0.sync.x", b"\xff\xfe"):
            sock = group._ctx.socket(transport.zmq.DEALER)
            sock.setsockopt(transport.zmq.IDENTITY, ident)
            sock.setsockopt(transport.zmq.LINGER, 0)
            sock.connect(group.address)
            strangers[ident] = sock
        start = group.stats()
        expect = {"invalid": 0, "dropped": 0, "late_replies": 0, "examples": 0}

        async def stranger_then_serve(ident, frames, n):
            transport.send(strangers[ident], frames)
            expect["invalid"] += 1  # nothing from an unknown identity is used
            await serving(group, n)
            assert await eventually(lambda: group.stats()["invalid"] == start["invalid"] + expect["invalid"], 10)  # fmt: skip

        async def forged_then_serve(channel, frames, n):
            # A second socket cannot take a worker's identity (the ROUTER refuses it; see the
            # test below), so forged traffic from worker 0 is handed to the controller's message
            # handler exactly as its reader hands what arrives: [identity, header, *payloads].
            group._on_message([protocol.identity(0, channel), *frames])
            await serving(group, n)

        @FUZZ
        @given(
            messages(sorted(protocol.KINDS)),
            st.sampled_from(["io", "sync"]) | st.sampled_from(sorted(strangers)),
        )
        def example(frames, source):
            expect["examples"] += 1
            if source in strangers:
                on_loop(stranger_then_serve(source, frames, expect["examples"]), "a stranger")
                return
            msg, err = judge(frames)
            if err is not None or msg.kind == "hello":  # a hello after joining is not believed
                expect["invalid"] += 1
            elif msg.kind in ("reply", "error", "ready"):
                expect["late_replies"] += 1  # answers no call in flight
            elif msg.kind not in ("heartbeat", "bye"):
                expect["dropped"] += 1  # a controller-to-worker kind
            on_loop(forged_then_serve(source, frames, expect["examples"]), "a forged message")

        try:
            await asyncio.to_thread(example)
        finally:
            for sock in strangers.values():
                sock.close(0)
        end = group.stats()
        for counter in ("invalid", "dropped", "late_replies"):
            assert end[counter] - start[counter] == expect[counter], counter
        assert end["in_flight"] == 0 and group.failure is None and group.is_alive(0)
        await serving(group, -1)
    print(f"live wire, controller: {expect}")


async def test_a_stranger_claiming_a_workers_identity_is_not_heard():
    async with await ActorGroup.spawn(Echo, 1) as group:
        call = group[0].call("sleep", 0.5, "the worker's answer")
        msg_id = call._msg_id
        impostor = group._ctx.socket(transport.zmq.DEALER)
        impostor.setsockopt(transport.zmq.IDENTITY, protocol.identity(0, "sync"))
        impostor.connect(group.address)
        try:
            for _ in range(3):
                transport.send(impostor, protocol.encode_reply(msg_id, "forged"))
            assert await asyncio.wait_for(call, 10) == "the worker's answer"
        finally:
            impostor.close(0)
        stats = group.stats()
        assert stats["invalid"] == 0 and stats["late_replies"] == 0
        assert await group[0].call("echo", "still") == "still"
