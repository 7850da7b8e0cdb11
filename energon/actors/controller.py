"""The controller: one ROUTER socket, futures keyed by call id, resolved in whatever order replies come.

Runs entirely on the event loop that created the group and never blocks it. Whether workers are
alive is actors/liveness.py's concern; large tensors to and from workers on this host go through
shared memory (actors/shm.py).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from energon.actors import launch, protocol, shm, transport
from energon.actors.handle import ActorHandle, CallFuture
from energon.actors.liveness import Liveness
from energon.actors.startup import Startup, target_name
from energon.errors import ProtocolError, RemoteError, WorkerFailed

DEFAULT_HEARTBEAT_TIMEOUT = 5.0


class ActorGroup:
    """world_size workers, each hosting one actor. Create with `spawn` or `attach`."""

    def __init__(
        self,
        world_size: int,
        address: str | None,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        shm_segment_bytes: int = shm.DEFAULT_SEGMENT_BYTES,
        shm_min_bytes: int = shm.DEFAULT_MIN_BYTES,
    ):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1 (got {world_size})")
        if heartbeat_timeout <= 0:
            raise ValueError(f"heartbeat_timeout must be > 0 (got {heartbeat_timeout})")
        self.loop = asyncio.get_running_loop()
        self.world_size = world_size
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_timeout / 5
        self.limits = protocol.Limits(max_message_bytes)
        self.shm_segment_bytes = shm_segment_bytes
        self.shm_min_bytes = shm_min_bytes
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
        self._who = {
            ident: (rank, channel)
            for rank, pair in enumerate(self._idents)
            for ident, channel in zip(pair, ("io", "sync"), strict=True)
        }
        self._inflight: list[dict[int, asyncio.Future]] = [{} for _ in range(world_size)]
        self._startup = Startup(self.loop, world_size, self.address)
        self._byes = [self.loop.create_future() for _ in range(world_size)]
        self._links: list[shm.Link | None] = [None] * world_size
        self._methods: dict[str, bool] = {}
        self._counters = {"invalid": 0, "dropped": 0, "late_replies": 0, "calls": 0}
        self._closed = False
        self._shutdown_task: asyncio.Future | None = None
        self._on_shutdown: list[Callable[[], Any]] = []
        self._reader = transport.LoopReader(self.loop, self._sock, self._on_message, head=2)
        self._liveness = Liveness(
            self.loop,
            world_size,
            self.heartbeat_interval,
            heartbeat_timeout,
            drain=self._reader.drain,
            beat=lambda rank: self._send(rank, "io", "heartbeat"),
            on_failed=self._on_failed,
            joined=lambda rank: self._startup.joined[rank].done(),
        )
        self._handles = [ActorHandle(self, r) for r in range(world_size)]

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
        shm_segment_bytes: int = shm.DEFAULT_SEGMENT_BYTES,
        shm_min_bytes: int = shm.DEFAULT_MIN_BYTES,
    ) -> ActorGroup:
        """Starts world_size local worker processes (spawn context), each constructing
        actor(*args, **kwargs); returns once every actor is built.

        env: extra environment for every worker (a dict) or per rank (a list of dicts); workers
        inherit os.environ too. address: where the controller listens (default a private ipc://).
        shm_segment_bytes: shared memory per direction and worker for tensors of at least
        shm_min_bytes (0: always ZeroMQ frames). Raises WorkerFailed if a worker dies or does not
        connect within start_timeout, RemoteError if a constructor raises; in both cases every
        process started is gone.
        """
        target = target_name(actor)
        group = cls(
            world_size,
            address,
            heartbeat_timeout=heartbeat_timeout,
            max_message_bytes=max_message_bytes,
            shm_segment_bytes=shm_segment_bytes,
            shm_min_bytes=shm_min_bytes,
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
                group._liveness.watch_process(rank, proc)
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
        shm_segment_bytes: int = shm.DEFAULT_SEGMENT_BYTES,
        shm_min_bytes: int = shm.DEFAULT_MIN_BYTES,
    ) -> ActorGroup:
        """Listens on address (tcp://HOST:PORT) for workers started elsewhere
        (`energon worker --controller tcp://HOST:PORT --rank R`), builds actor on each and
        returns once all world_size ranks are ready: `listen` then `join`. Workers that turn out
        to share this host exchange large tensors through shared memory, the others through frames.

        Raises WorkerFailed naming the missing ranks if they do not connect within start_timeout,
        RemoteError if a constructor raises; connected workers are then told to exit.
        """
        group = cls.listen(
            world_size,
            address,
            heartbeat_timeout=heartbeat_timeout,
            max_message_bytes=max_message_bytes,
            shm_segment_bytes=shm_segment_bytes,
            shm_min_bytes=shm_min_bytes,
        )
        await group.join(actor, args, kwargs, start_timeout=start_timeout)
        return group

    @classmethod
    def listen(
        cls,
        world_size: int,
        address: str,
        *,
        heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
        max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
        shm_segment_bytes: int = shm.DEFAULT_SEGMENT_BYTES,
        shm_min_bytes: int = shm.DEFAULT_MIN_BYTES,
    ) -> ActorGroup:
        """Binds address (tcp://HOST:PORT; port 0 picks a free one, see `.address`) for workers
        started elsewhere and returns the group at once, so that a launcher can start them
        knowing where to send them; `join` then waits for them. Call it from the event loop
        the group will live on. Raises zmq.ZMQError if address cannot be bound."""
        return cls(
            world_size,
            address,
            heartbeat_timeout=heartbeat_timeout,
            max_message_bytes=max_message_bytes,
            shm_segment_bytes=shm_segment_bytes,
            shm_min_bytes=shm_min_bytes,
        )

    async def join(
        self,
        actor: type | str,
        args: Sequence = (),
        kwargs: dict | None = None,
        *,
        start_timeout: float = 300.0,
    ) -> None:
        """Waits for every rank of a `listen`ing group to connect, then builds actor on each.

        Raises WorkerFailed naming the ranks that did not connect within start_timeout (also
        `missing_ranks()`), or a failure reported meanwhile (`fail_worker`); RemoteError if a
        constructor raises. The group is shut down then (connected workers are told to exit).
        """
        try:
            await self._start(target_name(actor), args, kwargs, start_timeout)
        except BaseException:
            await self.shutdown()
            raise

    async def _start(self, target: str, args: Sequence, kwargs: dict | None, timeout: float):
        init = {
            "target": target, "args": list(args), "kwargs": dict(kwargs or {}),
            "world_size": self.world_size, "address": self.address,
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_timeout": self.heartbeat_timeout,
        }  # fmt: skip
        self._methods, self._links = await self._startup.run(
            self._init, init, timeout, self.shm_segment_bytes, self.shm_min_bytes
        )

    def _init(self, rank: int, meta: dict) -> asyncio.Future:
        fut = CallFuture(loop=self.loop)
        if not self._refuse(rank, fut):
            msg_id = next(self._ids)
            self._post(rank, True, msg_id, protocol.encode("init", msg_id, None, meta), fut)
        return fut

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
        sync = not self._methods.get(method, True)
        msg_id = next(self._ids)  # one id for every rank: the header is encoded once
        shared = protocol.encode_call(msg_id, method, args, kwargs)
        # a tensor that shared memory takes (shm_min_bytes or more): into each rank's own block,
        # so those ranks get their own encoding; smaller ones travel in the shared frames
        per_rank = any(self._links) and any(
            memoryview(f).nbytes >= self.shm_min_bytes for f in shared[1:]
        )
        futs = []
        for rank in range(self.world_size):
            fut = CallFuture(loop=self.loop)
            futs.append(fut)
            if self._refuse(rank, fut):
                continue
            link = self._links[rank]
            frames = shared
            if per_rank and link is not None:
                frames = protocol.encode_call(msg_id, method, args, kwargs, link.writer)
            self._post(rank, sync, msg_id, frames, fut)
        return asyncio.gather(*futs)

    def _call(self, rank: int, method: str, args: tuple, kwargs: dict) -> asyncio.Future:
        fut = CallFuture(loop=self.loop)
        if self._refuse(rank, fut):
            return fut
        msg_id = next(self._ids)
        link = self._links[rank]
        frames = protocol.encode_call(msg_id, method, args, kwargs, link and link.writer)
        self._post(rank, not self._methods.get(method, True), msg_id, frames, fut)
        return fut

    def _refuse(self, rank: int, fut: asyncio.Future) -> bool:
        """Fails fut and returns True if rank can take no call."""
        dead = self._liveness.dead[rank]
        if dead is None and not self._closed:
            return False
        reason = "group is shut down" if self._closed else dead.reason
        fut.set_exception(WorkerFailed(rank, reason))
        return True

    def _post(self, rank: int, sync: bool, msg_id: int, frames: list, fut: CallFuture) -> None:
        try:
            transport.send_to(self._sock, self._idents[rank][sync], frames)
        except zmq.ZMQError as exc:
            fut.set_exception(WorkerFailed(rank, f"not connected ({exc.strerror})"))
            return
        self._counters["calls"] += 1
        self._inflight[rank][msg_id] = fut
        fut._group, fut._rank, fut._msg_id = self, rank, msg_id
        self._reader.kick()

    def _cancelled(self, rank: int, msg_id: int) -> None:
        if self._inflight[rank].pop(msg_id, None) is not None:
            self._send(rank, "io", "cancel", msg_id)

    def _send(self, rank: int, channel: str, kind: str, msg_id: int = 0) -> None:
        try:
            ident = self._idents[rank][channel == "sync"]
            transport.send_to(self._sock, ident, protocol.encode(kind, msg_id))
        except zmq.ZMQError:
            pass  # not connected: liveness checks will notice if it matters
        self._reader.kick()

    # ------------------------------------------------------------------------------ receiving

    def _on_message(self, frames: list) -> None:
        who = self._who.get(frames[0])
        if who is None:
            self._counters["invalid"] += 1
            return
        rank, channel = who
        self._liveness.last_seen[rank] = time.monotonic()
        link = self._links[rank]
        try:
            msg = protocol.decode(frames[1:], self.limits, link and link.reader)
        except ProtocolError as exc:
            self._counters["invalid"] += 1
            fut = self._inflight[rank].pop(getattr(exc, "msg_id", -1), None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
            return
        kind = msg.kind
        if kind == "reply":
            fut = self._inflight[rank].pop(msg.id, None)
            if fut is None:
                self._counters["late_replies"] += 1
            elif not fut.done():
                fut.set_result(msg.meta["result"])
        elif kind == "error" or kind == "ready":
            fut = self._inflight[rank].pop(msg.id, None)
            m = msg.meta
            if fut is None:
                self._counters["late_replies"] += 1
            elif fut.done():
                pass
            elif kind == "ready":
                fut.set_result(m)
            else:
                fut.set_exception(RemoteError(m["type"], m["message"], m["traceback"], rank))
        elif kind == "heartbeat":
            pass
        elif kind == "hello":
            if not self._startup.on_hello(rank, channel, msg.meta):
                self._counters["invalid"] += 1
        elif kind == "bye":
            if not self._byes[rank].done():
                self._byes[rank].set_result(None)
        else:
            self._counters["dropped"] += 1

    # -------------------------------------------------------------------------------- failure

    def _on_failed(self, rank: int, failure: WorkerFailed) -> None:
        self._links[rank] = None  # its segments go once no tensor received from it is alive
        inflight, self._inflight[rank] = self._inflight[rank], {}
        for fut in inflight.values():
            if not fut.done():
                fut.set_exception(WorkerFailed(rank, failure.reason))
        for fut in (self._startup.joined[rank], self._byes[rank]):
            if not fut.done():
                fut.set_exception(WorkerFailed(rank, failure.reason))
                fut.exception()  # retrieved here; awaiting it re-raises all the same

    def fail_worker(self, rank: int, reason: str) -> None:
        """Declares rank failed, for a launcher that learns of a death first (its in-flight and
        later calls fail with WorkerFailed(rank, reason)); nothing happens if it already had."""
        self._liveness.fail(rank, reason)

    def missing_ranks(self) -> list[int]:
        """The ranks whose worker has not connected (both channels) to this group."""
        return [r for r, channels in enumerate(self._startup.channels) if len(channels) < 2]

    def on_shutdown(self, callback: Callable[[], Any]) -> None:
        """Calls callback() (awaited if it returns an awaitable) once the workers are gone at
        shutdown, in registration order: what a launcher must release with the group."""
        self._on_shutdown.append(callback)

    def add_failure_callback(self, callback: Callable[[WorkerFailed], Any]) -> None:
        """Calls callback(WorkerFailed) on the loop, once for each worker that fails."""
        self._liveness.callbacks.append(callback)

    async def wait_failed(self) -> WorkerFailed:
        """Returns the first WorkerFailed of this group once some worker has failed."""
        return await self._liveness.wait_failed()

    @property
    def failure(self) -> WorkerFailed | None:
        """The first WorkerFailed of this group (not counting the shutdown), or None."""
        return self._liveness.failure

    def is_alive(self, rank: int) -> bool:
        """False once rank has failed or the group is shut down."""
        return not self._closed and self._liveness.dead[rank] is None

    def stats(self) -> dict[str, int]:
        """Counters: calls sent, invalid messages and dropped ones received, late replies,
        calls in flight, workers linked by shared memory, tensors that found no room there."""
        links = [link for link in self._links if link is not None]
        return dict(
            self._counters,
            in_flight=sum(map(len, self._inflight)),
            shm_links=len(links),
            shm_fallbacks=sum(link.writer.fallbacks for link in links),
        )

    # ------------------------------------------------------------------------------- shutdown

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stops every worker and waits until its process is gone (terminate, then kill, after
        timeout); fails calls still in flight with WorkerFailed. Idempotent."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.ensure_future(self._shutdown(timeout))
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, timeout: float) -> None:
        self._closed = True
        self._liveness.stop_heartbeats()
        for rank in range(self.world_size):
            if self._liveness.dead[rank] is None:
                self._send(rank, "sync", "shutdown")
                self._send(rank, "io", "shutdown")
            self._liveness.fail(rank, "group is shut down")
        if self._liveness.processes:
            await self._liveness.reap(timeout)
        else:  # attached workers: wait for their goodbyes
            byes = [
                f for r, f in enumerate(self._byes) if self._startup.channels[r] and not f.done()
            ]
            if byes:
                await asyncio.wait(byes, timeout=timeout)
        self._reader.close()
        self._liveness.close()
        for callback in self._on_shutdown:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # one launcher's release failing must not keep the rest
                self.loop.call_exception_handler(
                    {"message": "energon.actors: a shutdown callback raised", "exception": exc}
                )
        self._ctx.destroy(linger=0)  # closes every socket of this group's context, then ends it
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def __aenter__(self) -> ActorGroup:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.shutdown()

    def __repr__(self) -> str:
        alive = sum(self.is_alive(r) for r in range(self.world_size))
        return f"ActorGroup(world_size={self.world_size}, alive={alive}, address={self.address!r})"
