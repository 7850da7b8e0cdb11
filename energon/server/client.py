"""energon.Client: talk to `energon serve --zmq ...` from asyncio, with the Engine's API.

    async with Client("tcp://127.0.0.1:5555") as client:
        done = await client.infer("Hello", SamplingParams(max_tokens=16, temperature=0))
        async for piece in client.stream("Once upon a time"):
            print(piece.text, end="")

One DEALER socket carries any number of concurrent requests; a reader task hands each reply to its
request by id. Errors the server reports are raised as InvalidRequest, Overloaded, or
energon.server.messages.ServerError subclasses (Unauthorized, TooLarge, Unavailable).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from energon.errors import EnergonError
from energon.sampling import Completion, SamplingParams, StreamPiece
from energon.server.keys import load_public_key
from energon.server.messages import (
    Unauthorized,
    completion_from_final,
    decode_reply,
    encode_abort,
    encode_generate,
    error_from_reply,
    logprobs_from_reply,
    timings_from_final,
)

_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class Client:
    """A connection to an Energon ZeroMQ door. `api_key`: sent with every request when the
    server requires one. `server_key`: the server's CURVE public key (a Z85 string or the path
    of server.key from `energon keygen`), required when the server uses CURVE."""

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        server_key: str | bytes | None = None,
        context: zmq.asyncio.Context | None = None,
    ):
        self.address = address
        self.api_key = api_key
        if isinstance(server_key, str):
            server_key = load_public_key(server_key)
        self.server_key = server_key
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._pending: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._reader: asyncio.Task | None = None
        self._failure: EnergonError | None = None
        self._closed = False

    async def __aenter__(self) -> Client:
        self._connect()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _connect(self) -> zmq.asyncio.Socket:
        if self._closed:
            raise EnergonError("this Client is closed")
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            if self.server_key is not None:
                sock.curve_serverkey = self.server_key
                sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
            sock.connect(self.address)
            self._sock = sock
            self._reader = asyncio.ensure_future(self._read())
            self._spawn(self._watch(monitor))
        return self._sock

    async def close(self) -> None:
        """Fail what is still pending and close the socket."""
        if self._closed:
            return
        self._closed = True
        for task in [self._reader, *self._tasks]:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in [self._reader, *self._tasks] if t is not None), return_exceptions=True
        )
        self._fail(EnergonError("the Client was closed"))
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(linger=0)

    # ------------------------------------------------------------------------------ requests

    async def infer(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> Completion:
        """The whole completion. Raises the server's error (InvalidRequest, Overloaded,
        Unauthorized, ...); cancelling the awaiting task aborts the request on the server."""
        text, ids, logprobs = [], [], None
        async for msg in self._request(prompt, params, stream=False):
            text.append(msg["text"])
            ids.extend(msg["token_ids"])
            logprobs = logprobs_from_reply(msg)  # stream=False: all of them come in the final
            if msg["type"] == "final":
                return completion_from_final(msg, "".join(text), ids, logprobs)
        raise EnergonError("the server ended the request without a final reply")

    async def stream(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None
    ) -> AsyncIterator[StreamPiece]:
        """Pieces as the server sends them; the last has finish_reason. Raises like `infer`;
        closing the iteration early aborts the request on the server."""
        async for msg in self._request(prompt, params, stream=True):
            final = msg["type"] == "final"
            yield StreamPiece(
                msg["text"],
                msg["token_ids"],
                msg.get("finish_reason"),
                logprobs_from_reply(msg),
                timings_from_final(msg) if final else None,
            )

    async def _request(self, prompt, params, stream: bool) -> AsyncIterator[dict]:
        sock = self._connect()
        if self._failure is not None:
            raise self._failure
        params = SamplingParams() if params is None else params
        rid = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[rid] = queue
        finished = False
        try:
            await sock.send(encode_generate(rid, prompt, params, stream, self.api_key))
            while True:
                msg = await queue.get()
                if isinstance(msg, BaseException):
                    finished = True
                    raise msg
                if msg["type"] == "error":
                    finished = True
                    raise error_from_reply(
                        msg.get("status", 500),
                        msg.get("kind", "internal_error"),
                        msg.get("field"),
                        msg.get("message", ""),
                    )
                finished = msg["type"] == "final"
                yield msg
                if finished:
                    return
        finally:
            self._pending.pop(rid, None)
            if not finished and not self._closed:
                self._spawn(sock.send(encode_abort(rid)))

    # ------------------------------------------------------------------------------ internals

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, exc: EnergonError) -> None:
        self._failure = self._failure or exc
        for queue in self._pending.values():
            queue.put_nowait(exc)

    async def _read(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                msg = decode_reply(frame)
            except ValueError:
                continue  # not ours: ignore
            queue = self._pending.get(msg.get("id"))
            if queue is not None:
                queue.put_nowait(msg)
            elif msg["type"] == "error" and msg.get("id") is None:
                # An error the server could not tie to a request (e.g. an unreadable message).
                err = error_from_reply(msg["status"], msg["kind"], msg.get("field"), msg["message"])
                for q in self._pending.values():
                    q.put_nowait(err)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """A failed handshake means our keys are wrong for this server: fail every request."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] & _HANDSHAKE_FAILED:
                    hint = (
                        "the server requires CURVE: pass its public key (server_key / --server-key)"
                        if self.server_key is None
                        else "the server_key does not match the server's CURVE key"
                    )
                    self._fail(Unauthorized(f"the handshake with {self.address} failed: {hint}"))
        finally:
            monitor.close(linger=0)
