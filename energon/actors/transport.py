"""ZeroMQ sockets driven by an asyncio loop without polling: one ROUTER, DEALERs, a drain-on-ready reader.

A ZeroMQ socket's file descriptor is edge-triggered and also resets when the socket itself processes
commands during a send. So the reader drains every ready message when the descriptor fires (until
a receive finds none), and `kick()` makes sure there is one more look after this side has sent:
one per turn of the loop, however many messages were sent in it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import zmq
import zmq.backend

POLLIN = int(zmq.POLLIN)
EVENTS = int(zmq.EVENTS)
RCVMORE = int(zmq.RCVMORE)
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
# pyzmq's Socket.send less its Python wrapper (which only handles RADIO groups / SERVER routing ids)
_send = zmq.backend.Socket.send
# Frames below this are copied into ZeroMQ (cheaper than pinning a Python buffer); larger ones
# are sent straight from their own memory.
ZERO_COPY_MIN = 64 * 1024


def send(sock: zmq.Socket, frames: list) -> None:
    """Sends frames as one multipart message; large frames without a copy."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _send(sock, frame, SNDMORE if i < last else 0, len(frame) < ZERO_COPY_MIN)


def send_to(sock: zmq.Socket, ident: bytes, frames: list) -> None:
    """Sends frames to the ROUTER peer named ident; raises zmq.ZMQError (EHOSTUNREACH) before
    anything is queued if no such peer is connected."""
    _send(sock, ident, SNDMORE)
    if len(frames) == 1 and len(frames[0]) < ZERO_COPY_MIN:
        _send(sock, frames[0])
    else:
        send(sock, frames)


def recv(sock: zmq.Socket, flags: int = 0, head: int = 1) -> list:
    """Receives one multipart message: its first `head` frames (a ROUTER's routing id, the
    header) as bytes, the payload frames after them as zmq.Frame views of ZeroMQ's own buffers
    (no copy)."""
    frames = [sock.recv(flags)]
    while sock.getsockopt(RCVMORE):
        frames.append(sock.recv(flags, copy=len(frames) < head))
    return frames


def _recv_rest(sock: zmq.Socket, frames: list, head: int) -> list:
    while sock.getsockopt(RCVMORE):
        frames.append(sock.recv(0, copy=len(frames) < head))
    return frames


# How many messages one drain handles before yielding to the loop, so a flood cannot starve
# timers (heartbeats) or other tasks.
DRAIN_BATCH = 256


def router(ctx: zmq.Context, address: str) -> zmq.Socket:
    """A bound ROUTER that raises (instead of dropping) when sending to an unknown peer."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    _common(sock)
    sock.bind(address)
    return sock


def dealer(ctx: zmq.Context, address: str, identity: bytes) -> zmq.Socket:
    """A DEALER named `identity`, connected to address."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    _common(sock)
    sock.connect(address)
    return sock


def _common(sock: zmq.Socket) -> None:
    # Unbounded queues: a send never blocks or drops; flow control is the caller's (calls in
    # flight are bounded by the caller's own futures).
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    for opt, value in ((zmq.SNDBUF, 4 << 20), (zmq.RCVBUF, 4 << 20)):
        sock.setsockopt(opt, value)


class LoopReader:
    """Calls handler(frames) for every message arriving on sock, from loop's own thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: zmq.Socket,
        handler: Callable[[list], None],
        head: int = 1,
    ):
        self.head = head
        self.loop = loop
        self.sock = sock
        self.handler = handler
        self.fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self._closed = False
        loop.add_reader(self.fd, self._on_readable)
        self._scheduled = True
        loop.call_soon(self.drain)

    def _on_readable(self) -> None:
        # Handle the first message at once, then let the callers its handler woke run before
        # looking for more: the look (one EVENTS read) then also covers their sends (kick()).
        if self._closed:
            return
        try:
            first = self.sock.recv(NOBLOCK)
        except zmq.Again:  # this receive re-armed the descriptor
            return
        self._handle(_recv_rest(self.sock, [first], self.head))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._look)

    def kick(self) -> None:
        """Call after sending on the socket: a send can swallow the descriptor's edge, so look
        whether a message is already waiting once this turn of the loop is over."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self.loop.call_soon(self._look)

    def _look(self) -> None:
        self._scheduled = False
        if not self._closed and self.sock.getsockopt(EVENTS) & POLLIN:
            self.drain()

    def drain(self) -> None:
        """Handles every message waiting (up to DRAIN_BATCH; then continues on a later turn)."""
        self._scheduled = False
        sock, head, again = self.sock, self.head, zmq.Again
        for _ in range(DRAIN_BATCH):
            if self._closed:
                return
            try:
                first = sock.recv(NOBLOCK)
            except again:  # none left; this receive also re-armed the descriptor
                return
            self._handle(_recv_rest(sock, [first], head))
        self._scheduled = True  # more are waiting: continue after other callbacks had their turn
        self.loop.call_soon(self.drain)

    def _handle(self, frames: list) -> None:
        try:
            self.handler(frames)
        except Exception as exc:  # a handler bug must not stop the drain and wedge the socket
            self.loop.call_exception_handler(
                {"message": "energon.actors: message handler raised", "exception": exc}
            )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self.fd)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (for a rendezvous or a test server to bind next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
