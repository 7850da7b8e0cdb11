"""ZeroMQ sockets driven by an asyncio loop without polling: one ROUTER, DEALERs, a drain-on-ready reader.

A ZeroMQ socket's file descriptor is edge-triggered and also resets when the socket itself processes
commands during a send. So the reader drains every ready message when the descriptor fires, and
`kick()` schedules one more drain after this side has sent (cheap: one EVENTS read).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq

POLLIN = int(zmq.POLLIN)
EVENTS = int(zmq.EVENTS)
RCVMORE = int(zmq.RCVMORE)
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
# Frames below this are copied into ZeroMQ (cheaper than pinning a Python buffer); larger ones
# are sent straight from their own memory.
ZERO_COPY_MIN = 64 * 1024


def send(sock: zmq.Socket, frames: list) -> None:
    """Sends frames as one multipart message; large frames without a copy."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, SNDMORE if i < last else 0, copy=len(frame) < ZERO_COPY_MIN)


def recv(sock: zmq.Socket, flags: int = 0, head: int = 1) -> list:
    """Receives one multipart message: its first `head` frames (a ROUTER's routing id, the
    header) as bytes, the payload frames after them as zmq.Frame views of ZeroMQ's own buffers
    (no copy)."""
    frames = [sock.recv(flags)]
    while sock.getsockopt(RCVMORE):
        frames.append(sock.recv(flags, copy=len(frames) < head))
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
        loop.add_reader(self.fd, self.drain)
        self._scheduled = True
        loop.call_soon(self.drain)

    def kick(self) -> None:
        """Call after sending on the socket: a send can swallow the descriptor's edge, so look
        (cheaply) whether a message is already waiting and, if so, drain on the next turn."""
        if not self._scheduled and not self._closed and self.sock.getsockopt(EVENTS) & POLLIN:
            self._scheduled = True
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        self._scheduled = False
        sock, handler = self.sock, self.handler
        for _ in range(DRAIN_BATCH):
            if self._closed or not sock.getsockopt(EVENTS) & POLLIN:
                return
            frames = recv(sock, NOBLOCK, self.head)
            try:
                handler(frames)
            except Exception as exc:  # a handler bug must not stop the drain and wedge the socket
                self.loop.call_exception_handler(
                    {"message": "energon.actors: message handler raised", "exception": exc}
                )
        self._scheduled = True  # more are waiting: continue after other callbacks had their turn
        self.loop.call_soon(self.drain)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.loop.remove_reader(self.fd)
