"""The controller: one ROUTER socket, futures keyed by call id, resolved in whatever order replies come.

Runs entirely on the event loop that created the group and never blocks it. Liveness comes from
two sources: local process sentinels (instant) and heartbeats (any message counts).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from energon.actors import launch, protocol, transport
from energon.errors import ProtocolError, RemoteError, WorkerFailed

DEFAULT_HEARTBEAT_TIMEOUT = 5.0
_live_groups: weakref.WeakSet[ActorGroup] = weakref.WeakSet()


def _target_name(actor: type | str) -> str:
    if isinstance(actor, str):
        return actor
    if not isinstance(actor, type):
        raise TypeError(f"actor must be a class or 'module:Class' (got {type(actor).__name__})")
    return f"{actor.__module__}:{actor.__qualname__}"


class ActorHandle:
    """One worker of a group: `await handle.call("method", *args, **kwargs)`."""

    __slots__ = ("group", "rank")

    def __init__(self, group: ActorGroup, rank: int):
        self.group = group
        self.rank = rank

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> asyncio.Future:
        """Sends the call now; returns a future of the method's result.

        The future raises RemoteError if the method raised, WorkerFailed if the worker dies or
        the group shuts down first. Raises TypeError at once for arguments that cannot travel.
        Cancelling the future (or the task awaiting it) cancels the call on the worker.
        """
        return self.group._call(self.rank, method, args, kwargs)

    def __repr__(self) -> str:
        return f"ActorHandle(rank={self.rank})"


class ActorGroup:
    """world_size workers, each hosting one actor. Create with `spawn` or `attach`."""

    def __init__(
        self,
        world_size: int,
        address: str,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        heartbeat_interval: float | None = None,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1 (got {world_size})")
        if heartbeat_timeout <= 0:
            raise ValueError(f"heartbeat_timeout must be > 0 (got {heartbeat_timeout})")
        self.loop = asyncio.get_running_loop()
        self.world_size = world_size
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval or heartbeat_timeout / 5
        self.limits = protocol.Limits(max_message_bytes)
        self._tmpdir: str | None = None
        if address is None:
            self._tmpdir = tempfile.mkdtemp(prefix="energon-")
            address = f"ipc://{self._tmpdir}/controller"
        self._ctx = zmq.Context(io_threads=1)
        self._sock = transport.router(self._ctx, address)
        self.address: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ids = itertools.count(1)
        self._idents = [
            (protocol.identity(r, "io"), protocol.identity(r, "sync")) for r in range(world_size)
        ]
        self._inflight: list[dict[int, asyncio.Future]] = [{} for _ in range(world_size)]
        self._channels: list[set[str]] = [set() for _ in range(world_size)]
        self._joined = [self.loop.create_future() for _ in range(world_size)]
        self._byes = [self.loop.create_future() for _ in range(world_size)]
        self._last_seen = [0.0] * world_size
        self._dead: list[WorkerFailed | None] = [None] * world_size
        self._methods: dict[str, bool] = {}
        self._processes: list = []
        self._exited: list[asyncio.Future] = []
        self._counters = {"invalid": 0, "dropped": 0, "late_replies": 0, "calls": 0}
        self._failure_callbacks: list[Callable[[WorkerFailed], Any]] = []
        self._failed_event = asyncio.Event()
        self.failure: WorkerFailed | None = None
        self._closed = False
        self._shutdown_task: asyncio.Future | None = None
        self._reader = transport.LoopReader(self.loop, self._sock, self._on_message, head=2)
        self._next_tick = time.monotonic() + self.heartbeat_interval
        self._timer = self.loop.call_later(self.heartbeat_interval, self._tick)
        self._handles = [ActorHandle(self, r) for r in range(world_size)]
        _live_groups.add(self)

    # ------------------------------------------------------------------------------ creation

    @classmethod
    async def spawn(
        cls,
        actor: type | str,
        world_size: int,
        args: Sequence = (),
        kwargs: dict | None = None,
        env: dict[str, str] | Sequence[dict[str, str]] | None = None,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        start_timeout: float = 120.0,
        address: str | None = None,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        worker_loop: str = "auto",
    ) -> ActorGroup:
        """Starts world_size local worker processes (spawn context), each constructing
        actor(*args, **kwargs); returns once every actor is built.

        env: extra environment for every worker (a dict) or per rank (a list of dicts); workers
        inherit os.environ too. address: where the controller listens (default a private ipc://).
        Raises WorkerFailed if a worker dies or does not connect within start_timeout, RemoteError
        if a constructor raises; in both cases every process started is gone.
        """
        target = _target_name(actor)
        group = cls(
            world_size,
            address,
            heartbeat_timeout=heartbeat_timeout,
            max_message_bytes=max_message_bytes,
        )
        try:
            for rank in range(world_size):
                rank_env = env[rank] if isinstance(env, (list, tuple)) else env
                proc = launch.start_worker(
                    group.address,
                    rank,
                    env=rank_env,
                    max_message_bytes=max_message_bytes,
                    connect_timeout=start_timeout,
                    loop=worker_loop,
                )
                group._watch_process(rank, proc)
            await group._start(target, args, kwargs, start_timeout)
        except BaseException:
            await group.shutdown()
            raise
        return group

    @classmethod
    async def attach(
        cls,
        actor: str,
        world_size: int,
        address: str,
        args: Sequence = (),
        kwargs: dict | None = None,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        start_timeout: float = 300.0,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> ActorGroup:
        """Listens on address (tcp://HOST:PORT) for workers started elsewhere
        (`energon worker --controller tcp://HOST:PORT --rank R`), builds actor on each and
        returns once all world_size ranks are ready.

        Raises WorkerFailed naming the missing ranks if they do not connect within start_timeout,
        RemoteError if a constructor raises; connected workers are then told to exit.
        """
        group = cls(
            world_size,
            address,
            heartbeat_timeout=heartbeat_timeout,
            max_message_bytes=max_message_bytes,
        )
        try:
            await group._start(_target_name(actor), args, kwargs, start_timeout)
        except BaseException:
            await group.shutdown()
            raise
        return group

    def _watch_process(self, rank: int, proc) -> None:
        self._processes.append(proc)
        exited = self.loop.create_future()
        self._exited.append(exited)
        self.loop.add_reader(proc.sentinel, self._on_exit, rank, proc, exited)

    def _on_exit(self, rank: int, proc, exited: asyncio.Future, tries: int = 0) -> None:
        if tries == 0:
            self.loop.remove_reader(proc.sentinel)
        proc.join(0)
        if proc.exitcode is None and tries < 200:
            # the sentinel closes a moment before the exit status can be collected
            self.loop.call_later(0.005, self._on_exit, rank, proc, exited, tries + 1)
            return
        if not exited.done():
            exited.set_result(proc.exitcode)
        if not self._closed:
            self._reader.drain()  # take replies it sent before dying
            self._fail(rank, f"process exited with code {proc.exitcode}")

    async def _start(self, target: str, args: Sequence, kwargs: dict | None, timeout: float):
        _, pending = await asyncio.wait(
            self._joined, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
        )
        for joined in self._joined:
            if joined.done() and joined.exception() is not None:
                raise joined.exception()
        if pending:
            missing = [r for r, f in enumerate(self._joined) if not f.done()]
            raise WorkerFailed(
                missing[0], f"ranks {missing} did not connect to {self.address} within {timeout}s"
            )
        meta = {
            "target": target,
            "args": list(args),
            "kwargs": dict(kwargs or {}),
            "world_size": self.world_size,
            "address": self.address,
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
        }
        ready = await asyncio.gather(
            *(self._request(r, "sync", "init", None, meta) for r in range(self.world_size))
        )
        self._methods = ready[0]

    # ------------------------------------------------------------------------------- calling

    def __getitem__(self, rank: int) -> ActorHandle:
        return self._handles[rank]

    def __len__(self) -> int:
        return self.world_size

    def __iter__(self):
        return iter(self._handles)

    def broadcast(self, method: str, /, *args: Any, **kwargs: Any) -> asyncio.Future:
        """Calls method on every rank; a future of the results as a list in rank order.

        Raises like ActorHandle.call (the first failure); cancelling it cancels every call.
        """
        return asyncio.gather(
            *(self._call(r, method, args, kwargs) for r in range(self.world_size))
        )

    def _call(self, rank: int, method: str, args: tuple, kwargs: dict) -> asyncio.Future:
        channel = "io" if self._methods.get(method, True) else "sync"
        return self._request(rank, channel, "call", method, {"args": args, "kwargs": kwargs})

    def _request(self, rank: int, channel: str, kind: str, method, meta: dict) -> asyncio.Future:
        fut = self.loop.create_future()
        if self._dead[rank] is not None or self._closed:
            reason = "group is shut down" if self._closed else self._dead[rank].reason
            fut.set_exception(WorkerFailed(rank, reason))
            return fut
        msg_id = next(self._ids)
        frames = protocol.encode(kind, msg_id, method, meta)  # TypeError: raise to the caller
        ident = self._idents[rank][channel == "sync"]
        try:
            transport.send(self._sock, [ident, *frames])
        except zmq.ZMQError as exc:
            fut.set_exception(WorkerFailed(rank, f"not connected ({exc.strerror})"))
            return fut
        self._counters["calls"] += 1
        self._inflight[rank][msg_id] = fut
        fut.add_done_callback(functools.partial(self._settled, rank, msg_id))
        self._reader.kick()
        return fut

    def _settled(self, rank: int, msg_id: int, fut: asyncio.Future) -> None:
        if fut.cancelled() and self._inflight[rank].pop(msg_id, None) is not None:
            self._send(rank, "io", "cancel", msg_id)

    def _send(self, rank: int, channel: str, kind: str, msg_id: int = 0) -> None:
        try:
            ident = self._idents[rank][channel == "sync"]
            transport.send(self._sock, [ident, *protocol.encode(kind, msg_id)])
        except zmq.ZMQError:
            pass  # not connected: liveness checks will notice if it matters
        self._reader.kick()

    # ------------------------------------------------------------------------------ receiving

    def _on_message(self, frames: list) -> None:
        who = protocol.parse_identity(frames[0])
        if who is None or who[0] >= self.world_size:
            self._counters["invalid"] += 1
            return
        rank, channel = who
        self._last_seen[rank] = time.monotonic()
        try:
            msg = protocol.decode(frames[1:], self.limits)
        except ProtocolError as exc:
            self._counters["invalid"] += 1
            fut = self._inflight[rank].pop(getattr(exc, "msg_id", -1), None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            return
        kind = msg.kind
        if kind == "reply" or kind == "ready":
            fut = self._inflight[rank].pop(msg.id, None)
            if fut is None:
                self._counters["late_replies"] += 1
            elif not fut.done():
                fut.set_result(msg.meta["result"] if kind == "reply" else msg.meta["methods"])
        elif kind == "error":
            fut = self._inflight[rank].pop(msg.id, None)
            if fut is None:
                self._counters["late_replies"] += 1
            elif not fut.done():
                m = msg.meta
                fut.set_exception(RemoteError(m["type"], m["message"], m["traceback"], rank))
        elif kind == "heartbeat":
            pass
        elif kind == "hello":
            self._on_hello(rank, channel, msg.meta)
        elif kind == "bye":
            if not self._byes[rank].done():
                self._byes[rank].set_result(None)
        else:
            self._counters["dropped"] += 1

    def _on_hello(self, rank: int, channel: str, meta: dict) -> None:
        if meta["rank"] != rank or meta["channel"] != channel or channel in self._channels[rank]:
            self._counters["invalid"] += 1
            return
        self._channels[rank].add(channel)
        if len(self._channels[rank]) == 2 and not self._joined[rank].done():
            self._joined[rank].set_result(None)

    # ------------------------------------------------------------------------------- liveness

    def _tick(self) -> None:
        now = time.monotonic()
        late = now - self._next_tick > self.heartbeat_interval
        self._reader.drain()  # count what already arrived before judging anyone silent
        for rank in range(self.world_size):
            if self._dead[rank] is not None or not self._joined[rank].done():
                continue
            if not late and now - self._last_seen[rank] > self.heartbeat_timeout:
                self._fail(rank, f"no heartbeat for {self.heartbeat_timeout:g}s")
            else:
                self._send(rank, "io", "heartbeat")
        if late:  # this loop was blocked: give every worker a fresh window instead of failing it
            self._last_seen = [max(t, now) for t in self._last_seen]
        self._next_tick = now + self.heartbeat_interval
        self._timer = self.loop.call_later(self.heartbeat_interval, self._tick)

    def _fail(self, rank: int, reason: str) -> None:
        if self._dead[rank] is not None:
            return
        failure = WorkerFailed(rank, reason)
        self._dead[rank] = failure
        inflight, self._inflight[rank] = self._inflight[rank], {}
        for fut in inflight.values():
            if not fut.done():
                fut.set_exception(WorkerFailed(rank, reason))
        for fut in (self._joined[rank], self._byes[rank]):
            if not fut.done():
                fut.set_exception(WorkerFailed(rank, reason))
                fut.exception()  # retrieved here; awaiting it re-raises all the same
        if rank < len(self._processes) and self._processes[rank].is_alive():
            self._processes[rank].kill()  # silent but alive: make sure it is gone
        if self._closed:
            return
        if self.failure is None:
            self.failure = failure
            self._failed_event.set()
        for callback in self._failure_callbacks:
            self.loop.call_soon(callback, failure)

    def add_failure_callback(self, callback: Callable[[WorkerFailed], Any]) -> None:
        """Calls callback(WorkerFailed) on the loop, once for each worker that fails."""
        self._failure_callbacks.append(callback)

    async def wait_failed(self) -> WorkerFailed:
        """Returns the first WorkerFailed of this group once some worker has failed."""
        await self._failed_event.wait()
        return self.failure

    def is_alive(self, rank: int) -> bool:
        """False once rank has failed or the group is shut down."""
        return not self._closed and self._dead[rank] is None

    def stats(self) -> dict[str, int]:
        """Counters: calls sent, invalid messages and dropped ones received, late replies."""
        return dict(self._counters, in_flight=sum(map(len, self._inflight)))

    # ------------------------------------------------------------------------------- shutdown

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stops every worker and waits until its process is gone (terminate, then kill, after
        timeout); fails calls still in flight with WorkerFailed. Idempotent."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self._shutdown(timeout))
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, timeout: float) -> None:
        self._closed = True
        self._timer.cancel()
        for rank in range(self.world_size):
            if self._dead[rank] is None:
                self._send(rank, "sync", "shutdown")
                self._send(rank, "io", "shutdown")
            self._fail(rank, "group is shut down")
        waits = [f for f in self._exited if not f.done()]
        if not self._processes:  # attached workers: wait for their goodbyes
            waits = [f for r, f in enumerate(self._byes) if self._channels[r] and not f.done()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        for signal_name in ("terminate", "kill"):
            alive = [p for p, f in zip(self._processes, self._exited, strict=True) if not f.done()]
            for proc in alive:
                getattr(proc, signal_name)()
            if alive:
                await asyncio.wait([f for f in self._exited if not f.done()], timeout=2.0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._reader.close()
        for proc, exited in zip(self._processes, self._exited, strict=True):
            if not exited.done():  # survived SIGKILL: nothing more can be done; stop watching
                self.loop.remove_reader(proc.sentinel)
        self._ctx.destroy(linger=0)  # closes every socket of this group's context, then ends it
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        _live_groups.discard(self)

    async def __aenter__(self) -> ActorGroup:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        alive = sum(self.is_alive(r) for r in range(self.world_size))
        return f"ActorGroup(world_size={self.world_size}, alive={alive}, address={self.address!r})"


def _kill_leftovers() -> None:
    """At interpreter exit: workers of groups nobody shut down must not outlive us."""
    for group in list(_live_groups):
        for proc in group._processes:
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)


launch.register_exit_hook(_kill_leftovers)
