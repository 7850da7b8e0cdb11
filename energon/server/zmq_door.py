"""The ZeroMQ door: a ROUTER socket serving msgpack requests (energon/server/messages.py).

Each request runs as its own task; its replies go out as its pieces arrive, so requests of one
client and of many are answered in any order. A client may abort a request by id. A client that
disconnects mid-stream aborts its requests: ROUTER_MANDATORY makes the next send to it fail.
With CURVE keys the socket is a CURVE server: traffic is encrypted and clients must know its public
key; a client whose handshake fails is counted as unauthorized.
"""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from energon.errors import EnergonError, InvalidRequest
from energon.server.frontend import Frontend, Generation
from energon.server.messages import (
    AbortRequest,
    BadMessage,
    GenerateRequest,
    ServerError,
    decode_request,
    encode_delta,
    encode_error,
    encode_final,
)

log = logging.getLogger("energon.server")

DOOR = "zmq"
SEND_HWM = 100_000  # replies queued per client before sends wait
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class ZmqDoor:
    """Serves `frontend` on a ZeroMQ address (e.g. tcp://127.0.0.1:5555; port * picks one)."""

    def __init__(
        self,
        frontend: Frontend,
        address: str,
        *,
        curve_keys: tuple[bytes, bytes] | None = None,
    ):
        self.frontend = frontend
        self.address = address
        self.curve_keys = curve_keys
        self.endpoint: str | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: dict[tuple[bytes, int | str], asyncio.Task] = {}
        self._loops: list[asyncio.Task] = []

    async def start(self) -> str:
        """Bind; returns the bound endpoint. Raises zmq.ZMQError if the address is taken."""
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.RCVHWM, SEND_HWM)
        sock.setsockopt(zmq.LINGER, 1000)
        if self.curve_keys is not None:
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self.curve_keys
        monitor = sock.get_monitor_socket(_HANDSHAKE_FAILED)
        sock.bind(self.address)
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._loops = [
            asyncio.ensure_future(self._receive()),
            asyncio.ensure_future(self._watch(monitor)),
        ]
        return self.endpoint

    async def close(self) -> None:
        """Stop receiving, abort what still runs, close the socket."""
        for task in self._loops + list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks.values(), return_exceptions=True)
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close()
            self._ctx.destroy(linger=1000)

    # ------------------------------------------------------------------------------ receiving

    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            peer = frames[0]
            if len(frames) != 2:
                err = InvalidRequest("message", f"must be one frame (got {len(frames) - 1})")
                self.frontend.refuse(DOOR, err)
                await self._send(peer, encode_error(None, err))
                continue
            try:
                msg = decode_request(frames[1], self.frontend.limits.max_request_bytes)
            except BadMessage as bad:
                self.frontend.refuse(DOOR, bad.error)
                await self._send(peer, encode_error(bad.request_id, bad.error))
                continue
            if isinstance(msg, AbortRequest):
                task = self._tasks.get((peer, msg.id))
                if task is not None:
                    task.cancel()
                continue
            await self._admit(peer, msg)

    async def _admit(self, peer: bytes, msg: GenerateRequest) -> None:
        fe = self.frontend
        try:
            fe.check_key(msg.key)
            if (peer, msg.id) in self._tasks:
                raise InvalidRequest("id", f"{msg.id!r} is already in flight for this client")
            gen = fe.generation(msg.prompt, msg.params, DOOR)
        except (ServerError, InvalidRequest) as exc:
            fe.refuse(DOOR, exc)
            await self._send(peer, encode_error(msg.id, exc))
            return
        task = asyncio.ensure_future(self._serve(peer, msg, gen))
        self._tasks[(peer, msg.id)] = task
        task.add_done_callback(lambda _t, key=(peer, msg.id): self._tasks.pop(key, None))

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Counts failed handshakes (a client without the server's CURVE key) as unauthorized."""
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                if event["event"] & _HANDSHAKE_FAILED and self.curve_keys is not None:
                    self.frontend.metrics.count(DOOR, "unauthorized")
                    log.warning("energon: zmq handshake failed from %s", event["endpoint"])
        finally:
            monitor.close(linger=0)

    # ------------------------------------------------------------------------------ replying

    async def _send(self, peer: bytes, payload: bytes) -> bool:
        """False when the peer is gone (disconnected): its request should stop."""
        try:
            await self._sock.send_multipart([peer, payload], copy=False)
            return True
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise

    async def _serve(self, peer: bytes, msg: GenerateRequest, gen: Generation) -> None:
        pieces = gen.__aiter__()
        text, ids = [], []
        logprobs = [] if msg.params.logprobs else None
        try:
            async for piece in pieces:
                if msg.stream and piece.finish_reason is None:
                    if (piece.text or piece.token_ids) and not await self._send(
                        peer, encode_delta(msg.id, piece)
                    ):
                        return  # the client is gone: closing `pieces` aborts the request
                    continue
                text.append(piece.text)
                ids.extend(piece.token_ids)
                if logprobs is not None and piece.logprobs:
                    logprobs.extend(piece.logprobs)
            final = encode_final(
                msg.id,
                "".join(text),
                ids,
                gen.finish_reason or "abort",
                gen.usage,
                gen.timings,
                gen.abort_message,
                logprobs,
                gen.prompt_logprobs,
            )
            await self._send(peer, final)
        except asyncio.CancelledError:  # aborted by the client (or the door is closing)
            await pieces.aclose()
            final = encode_final(msg.id, "", [], "abort", gen.usage, gen.timings, "aborted")
            await self._send(peer, final)
        except EnergonError as exc:
            await self._send(peer, encode_error(msg.id, exc))
        finally:
            await pieces.aclose()
