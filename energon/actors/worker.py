"""One worker process: hosts an actor, runs the calls the controller sends, heartbeats.

Two ZeroMQ channels per worker (see protocol.identity):
- io: an asyncio loop that runs `async def` methods concurrently, answers heartbeats and cancels,
  and watches the controller; it never runs user code that blocks.
- sync: a dedicated thread that constructs the actor and runs plain methods one at a time in
  arrival order, replying on its own socket, in the same order. While it blocks (seconds in a
  collective), the io loop keeps heartbeating. A method may return a `Deferred` (a result the
  device is still computing): a helper thread waits for it while the sync thread starts the
  calls already waiting, and the reply goes out when it is ready (energon/actors/deferred.py).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import queue
import socket
import sys
import threading
import time
import traceback
from collections import deque

import zmq

from energon.actors import context, protocol, shm, transport
from energon.actors.deferred import Deferred
from energon.errors import ProtocolError

STATS_METHOD = "__energon_stats__"
EXIT_SHUTDOWN = 0
EXIT_CONTROLLER_SILENT = 3
EXIT_ACTOR_EXIT = 4
PRE_INIT_HEARTBEAT = 0.5  # seconds, until init says what the group uses


def resolve_target(target: str):
    """The class named "module:Qualified.Name"; raises ImportError/AttributeError/ValueError."""
    module, sep, qualname = target.partition(":")
    if not sep or not module or not qualname:
        raise ValueError(f"actor must be named 'module:Class' (got {target!r})")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def method_table(actor) -> dict[str, bool]:
    """Public callables of actor -> True for coroutine functions (run on the io loop)."""
    table = {}
    for name in dir(actor):
        if name.startswith("_"):
            continue
        if isinstance(inspect.getattr_static(actor, name, None), property):
            continue
        fn = getattr(actor, name, None)
        if callable(fn):
            table[name] = inspect.iscoroutinefunction(fn)
    return table


def _error_frames(msg_id: int, exc: BaseException) -> list:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return protocol.encode("error", msg_id, None, protocol.error_meta(exc, tb))


def _reply_frames(msg_id: int, result, out: shm.SegmentWriter | None) -> list:
    try:
        return protocol.encode_reply(msg_id, result, out)
    except Exception as exc:  # the result cannot travel: say so instead of replying nothing
        return _error_frames(msg_id, exc)


class SyncChannel:
    """The thread that builds the actor and runs its sync methods in arrival order, replying in
    the same order; `Deferred` results are waited for by a helper thread (`Completions`)."""

    def __init__(self, worker: Worker, sock: zmq.Socket):
        self.worker = worker
        self.sock = sock
        self.methods: dict = {}
        self.last_id = 0
        # replies not sent yet, in call order: frames, or (msg_id, Deferred) still computing
        self.pending: deque = deque()
        self.completions = Completions(worker.ctx)
        self.thread = threading.Thread(target=self._run, name="energon-sync", daemon=True)

    def _run(self) -> None:
        w, sock = self.worker, self.sock
        sock.send(protocol.encode("hello", 0, None, w.hello_meta("sync"))[0])
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self.completions.rx, zmq.POLLIN)
        try:
            while True:
                # A deferred result that is ready is answered before the next call starts: the
                # device is done with it, and its caller (with pipeline stages, every stage's
                # next step) may be waiting for it while calls queue up here.
                if self.pending and self.completions.rx in dict(poller.poll()):
                    self._send_ready(self.completions.take())
                    continue
                # _handle returns after dropping the message, so the shared-memory blocks of its
                # arguments are already free when the reply reaches the controller
                reply = self._handle(transport.recv(sock))
                if reply is _STOP:
                    while self.pending:  # answer what was started before leaving
                        self._send_ready(self.completions.take())
                    break
                if reply is not None:
                    self._answer(reply)
        finally:
            self.completions.close()
            sock.close(linger=1000)
            w.loop.call_soon_threadsafe(w.sync_finished)

    def _answer(self, reply) -> None:
        """Sends frames now, unless earlier replies are still computing; queues a deferred."""
        if isinstance(reply, tuple):
            self.completions.wait_for(reply[1])
        elif not self.pending:
            transport.send(self.sock, reply)
            return
        self.pending.append(reply)

    def _send_ready(self, done: int) -> None:
        """Sends the replies at the head of the queue that are ready, `done` more deferred
        results having completed (the helper finishes them in order)."""
        while self.pending:
            reply = self.pending[0]
            if isinstance(reply, tuple):
                if not done:
                    return
                done -= 1
                msg_id, deferred = reply
                try:
                    reply = _reply_frames(msg_id, deferred.reply(), self.worker.shm_out)
                except Exception as exc:
                    reply = _error_frames(msg_id, exc)
            self.pending.popleft()
            transport.send(self.sock, reply)

    def _handle(self, frames: list) -> list | None:
        """The frames to answer a message with (None: no answer, _STOP: leave)."""
        w = self.worker
        try:
            msg = protocol.decode(frames, w.limits, w.shm_in)
        except ProtocolError as exc:
            w.count("invalid")
            if getattr(exc, "kind", None) in ("call", "init"):
                return _error_frames(exc.msg_id, exc)
            return None
        if msg.kind == "call":
            return self._call(msg)
        if msg.kind == "init":
            return self._init(msg)
        if msg.kind == "shutdown":
            return _STOP
        w.count("dropped")
        return None

    def _init(self, msg: protocol.Message) -> list:
        w, meta = self.worker, msg.meta
        try:
            cls = resolve_target(meta["target"])
            context._set_current(context.ActorContext(w.rank, meta["world_size"], meta["address"]))
            w.loop.call_soon_threadsafe(
                w.configure, meta["heartbeat_interval"], meta["heartbeat_timeout"]
            )
            actor = cls(*meta["args"], **meta["kwargs"])
            table = method_table(actor)
        except BaseException as exc:
            return _error_frames(msg.id, exc)
        link = shm.accept(meta["shm"])
        if link is not None:
            w.shm_in, w.shm_out = link.reader, link.writer
        self.methods = {n: getattr(actor, n) for n, is_async in table.items() if not is_async}
        w.async_methods = {n: getattr(actor, n) for n, is_async in table.items() if is_async}
        ready = {"methods": table, "shm": link is not None}
        return protocol.encode("ready", msg.id, None, ready)

    def _call(self, msg: protocol.Message) -> list | None:
        cancelled = self.worker.cancelled
        if cancelled:
            if msg.id in cancelled:
                cancelled.discard(msg.id)
                return None
            if len(cancelled) > 64:  # ids only grow: older entries name calls already done
                cancelled.difference_update([i for i in list(cancelled) if i < msg.id])
        self.last_id = msg.id
        fn = self.methods.get(msg.method)
        try:
            if fn is None:
                raise AttributeError(f"actor has no public sync method {msg.method!r}")
            result = fn(*msg.meta["args"], **msg.meta["kwargs"])
            if isinstance(result, Deferred):
                return (msg.id, result)
            return _reply_frames(msg.id, result, self.worker.shm_out)
        except BaseException as exc:
            if isinstance(exc, Exception):
                return _error_frames(msg.id, exc)
            # SystemExit / KeyboardInterrupt: answer, then end the worker
            transport.send(self.sock, _error_frames(msg.id, exc))
            self.worker.loop.call_soon_threadsafe(self.worker.stop, EXIT_ACTOR_EXIT)
            return None


_STOP: list = []


class Completions:
    """A helper thread that waits for deferred results, in order, and counts each one done on
    an inproc socket (`rx`) that the sync thread polls beside its own."""

    def __init__(self, ctx: zmq.Context):
        address = f"inproc://energon-completions-{id(self)}"
        self.rx = ctx.socket(zmq.PULL)
        self.rx.bind(address)
        self.tx = ctx.socket(zmq.PUSH)  # used by the helper thread only, after this
        self.tx.connect(address)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def wait_for(self, deferred: Deferred) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="energon-wait", daemon=True)
            self.thread.start()
        self.queue.put(deferred)

    def take(self) -> int:
        """Blocks until at least one more deferred result is ready; returns how many are."""
        done = 0
        while True:
            try:
                self.rx.recv(0 if not done else zmq.NOBLOCK)
            except zmq.Again:
                return done
            done += 1

    def _run(self) -> None:
        while (deferred := self.queue.get()) is not None:
            if deferred.wait is not None:
                try:
                    deferred.wait()
                except BaseException as exc:
                    deferred.error = exc
            self.tx.send(b"")

    def close(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join(timeout=1.0)
            if self.thread.is_alive():  # stuck in a wait (a hung device): leave its socket be
                self.rx.close(linger=0)
                return
        self.tx.close(linger=0)
        self.rx.close(linger=0)


class Worker:
    """The io side of a worker: its event loop, io socket, heartbeats and async calls."""

    def __init__(self, address: str, rank: int, limits: protocol.Limits, connect_timeout: float):
        self.address = address
        self.rank = rank
        self.limits = limits
        self.connect_timeout = connect_timeout
        self.async_methods: dict = {}
        self.shm_in: shm.SegmentReader | None = None  # set at init if shared memory works
        self.shm_out: shm.SegmentWriter | None = None
        self.tasks: dict[int, asyncio.Task] = {}
        self.cancelled: set[int] = set()
        self.counters = {"invalid": 0, "dropped": 0}
        self.interval = PRE_INIT_HEARTBEAT
        self.timeout = connect_timeout

    def count(self, what: str) -> None:
        self.counters[what] += 1

    def hello_meta(self, channel: str) -> dict:
        return {
            "rank": self.rank,
            "channel": channel,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }

    async def run(self) -> int:
        """Serves until shutdown or controller silence; returns the process exit code."""
        self.loop = asyncio.get_running_loop()
        self.ctx = zmq.Context(io_threads=1)
        self.io = transport.dealer(self.ctx, self.address, protocol.identity(self.rank, "io"))
        sync_sock = transport.dealer(self.ctx, self.address, protocol.identity(self.rank, "sync"))
        self.sync = SyncChannel(self, sync_sock)
        self.done: asyncio.Future[int] = self.loop.create_future()
        self.sync_done = self.loop.create_future()
        self.last_rx = time.monotonic()
        self.reader = transport.LoopReader(self.loop, self.io, self._on_message)
        self.sync.thread.start()
        self._send(protocol.encode("hello", 0, None, self.hello_meta("io")))
        self.timer = self.loop.call_later(self.interval, self._tick)
        code = await self.done
        self.timer.cancel()
        for task in list(self.tasks.values()):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=1.0)
        if code == EXIT_SHUTDOWN:
            # the sync thread got its own shutdown; let it finish the call it is in, briefly
            await asyncio.wait([self.sync_done], timeout=2.0)
            self._send(protocol.encode("bye", 0))
        self.reader.close()
        self.io.close(linger=1000 if code == EXIT_SHUTDOWN else 0)
        return code

    def configure(self, interval: float, timeout: float) -> None:
        self.interval, self.timeout = interval, timeout

    def stop(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)

    def sync_finished(self) -> None:
        if not self.sync_done.done():
            self.sync_done.set_result(None)

    def _send(self, frames: list) -> None:
        transport.send(self.io, frames)
        self.reader.kick()

    def _tick(self) -> None:
        if time.monotonic() - self.last_rx > self.timeout:
            print(
                f"energon worker {self.rank}: controller silent for {self.timeout:.1f}s, exiting",
                file=sys.stderr,
            )
            self.stop(EXIT_CONTROLLER_SILENT)
            return
        self._send(protocol.encode("heartbeat", 0))
        self.timer = self.loop.call_later(self.interval, self._tick)

    def _on_message(self, frames: list) -> None:
        self.last_rx = time.monotonic()
        try:
            msg = protocol.decode(frames, self.limits, self.shm_in)
        except ProtocolError as exc:
            self.count("invalid")
            if getattr(exc, "kind", None) == "call":
                self._send(_error_frames(exc.msg_id, exc))
            return
        kind = msg.kind
        if kind == "call":
            self._call(msg)
        elif kind == "heartbeat":
            pass
        elif kind == "cancel":
            task = self.tasks.get(msg.id)
            if task is not None:
                task.cancel()
            elif msg.id > self.sync.last_id and len(self.cancelled) < 100_000:
                self.cancelled.add(msg.id)
        elif kind == "shutdown":
            self.stop(EXIT_SHUTDOWN)
        else:
            self.count("dropped")

    def _call(self, msg: protocol.Message) -> None:
        fn = self.async_methods.get(msg.method)
        if fn is None:
            if msg.method == STATS_METHOD:
                out = self.shm_out
                stats = dict(self.counters, shm_fallbacks=out.fallbacks if out else 0)
                self._send(_reply_frames(msg.id, stats, None))
                return
            err = AttributeError(f"actor has no public async method {msg.method!r}")
            self._send(_error_frames(msg.id, err))
            return
        try:
            coro = fn(*msg.meta["args"], **msg.meta["kwargs"])
        except Exception as exc:  # bad arguments raise before the coroutine exists
            self._send(_error_frames(msg.id, exc))
            return
        self.tasks[msg.id] = self.loop.create_task(self._run_async(msg.id, coro))

    async def _run_async(self, msg_id: int, coro) -> None:
        try:
            frames = _reply_frames(msg_id, await coro, self.shm_out)
        except asyncio.CancelledError:
            return  # cancelled by the controller (or shutdown): nobody waits for a reply
        except Exception as exc:
            frames = _error_frames(msg_id, exc)
        finally:
            self.tasks.pop(msg_id, None)
        self._send(frames)


def run_worker(
    address: str,
    rank: int,
    *,
    connect_timeout: float = 300.0,
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    loop: str = "auto",
) -> int:
    """Runs one worker until the controller shuts it down or goes silent; returns the exit code.

    loop: "uvloop", "asyncio" or "auto" (uvloop when installed).
    """
    worker = Worker(address, rank, protocol.Limits(max_message_bytes), connect_timeout)
    runner = asyncio.run
    if loop in ("auto", "uvloop"):
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            if loop == "uvloop":
                raise
    code = runner(worker.run())
    if worker.sync.thread.is_alive():
        # a sync method is still running and cannot be interrupted: leave without waiting for it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    worker.ctx.term()
    return code
