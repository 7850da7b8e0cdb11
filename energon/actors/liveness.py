"""Whether a group's workers are alive, who failed first, and making sure they are gone at the end.

Two sources: local process sentinels (a dead process is noticed at once) and heartbeats (any
message from a worker counts; a worker silent for heartbeat_timeout is failed and, if local,
killed). Stopping: wait for processes to exit, then terminate, then kill. Workers of groups nobody
shut down are killed at interpreter exit.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from typing import Any

from energon.actors import launch
from energon.errors import WorkerFailed

_live: weakref.WeakSet[Liveness] = weakref.WeakSet()


class Liveness:
    """Watches world_size workers on loop; fails each dead one once.

    drain(): take in the messages that already arrived (they count as signs of life);
    beat(rank): send rank a heartbeat; on_failed(rank, WorkerFailed): the group's part of failing
    rank (its calls); joined(rank): whether rank has connected (only then is silence judged).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        world_size: int,
        interval: float,
        timeout: float,
        *,
        drain: Callable[[], None],
        beat: Callable[[int], None],
        on_failed: Callable[[int, WorkerFailed], None],
        joined: Callable[[int], bool],
    ):
        self.loop = loop
        self.world_size = world_size
        self.interval = interval
        self.timeout = timeout
        self._drain, self._beat, self._on_failed, self._joined = drain, beat, on_failed, joined
        self.dead: list[WorkerFailed | None] = [None] * world_size
        self.failure: WorkerFailed | None = None  # the first, not counting the shutdown
        self.callbacks: list[Callable[[WorkerFailed], Any]] = []
        self._failed_event = asyncio.Event()
        self.last_seen = [0.0] * world_size  # time.monotonic() of rank's latest message
        self.processes: list = []  # local workers, by rank (empty for attached groups)
        self.exited: list[asyncio.Future] = []  # their exit codes
        self._stopped = False
        self._next_tick = time.monotonic() + interval
        self._timer = loop.call_later(interval, self._tick)
        _live.add(self)

    # ------------------------------------------------------------------------- processes

    def watch_process(self, rank: int, proc) -> None:
        """Fails rank as soon as proc (its multiprocessing.Process) exits."""
        self.processes.append(proc)
        exited = self.loop.create_future()
        self.exited.append(exited)
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
        if not self._stopped:
            self._drain()  # take replies it sent before dying
            reason = f"process exited with code {proc.exitcode}"
            if proc.exitcode == launch.UNGUARDED_MAIN_EXIT:
                reason += f": {launch.UNGUARDED_MAIN_HINT}"
            self.fail(rank, reason)

    # ---------------------------------------------------------------------------- failing

    def fail(self, rank: int, reason: str) -> None:
        """Declares rank failed (once): the group fails its calls, a local process still running
        is killed, and, unless the group is shutting down, the failure is recorded and reported."""
        if self.dead[rank] is not None:
            return
        failure = self.dead[rank] = WorkerFailed(rank, reason)
        self._on_failed(rank, failure)
        if rank < len(self.processes) and self.processes[rank].is_alive():
            self.processes[rank].kill()  # silent but alive: make sure it is gone
        if self._stopped:
            return
        if self.failure is None:
            self.failure = failure
            self._failed_event.set()
        for callback in self.callbacks:
            self.loop.call_soon(callback, failure)

    async def wait_failed(self) -> WorkerFailed:
        """Returns the first WorkerFailed once some worker has failed."""
        await self._failed_event.wait()
        return self.failure

    # ------------------------------------------------------------------------- heartbeats

    def _tick(self) -> None:
        now = time.monotonic()
        late = now - self._next_tick > self.interval
        self._drain()  # count what already arrived before judging anyone silent
        for rank in range(self.world_size):
            if self.dead[rank] is not None or not self._joined(rank):
                continue
            if not late and now - self.last_seen[rank] > self.timeout:
                self.fail(rank, f"no heartbeat for {self.timeout:g}s")
            else:
                self._beat(rank)
        if late:  # this loop was blocked: give every worker a fresh window instead of failing it
            self.last_seen = [max(t, now) for t in self.last_seen]
        self._next_tick = now + self.interval
        self._timer = self.loop.call_later(self.interval, self._tick)

    def stop_heartbeats(self) -> None:
        """Stops sending heartbeats and judging silence (process exits are still recorded)."""
        self._stopped = True
        self._timer.cancel()

    # --------------------------------------------------------------------------- stopping

    async def reap(self, timeout: float) -> None:
        """Waits up to timeout for local workers to exit, then terminates, then kills those left
        (2 s each); returns when all are gone or survived SIGKILL."""
        waits = [f for f in self.exited if not f.done()]
        if waits:
            await asyncio.wait(waits, timeout=timeout)
        for signal_name in ("terminate", "kill"):
            alive = [p for p, f in zip(self.processes, self.exited, strict=True) if not f.done()]
            for proc in alive:
                getattr(proc, signal_name)()
            if alive:
                await asyncio.wait([f for f in self.exited if not f.done()], timeout=2.0)

    def close(self) -> None:
        """Stops watching and releases each exited process's handles (its sentinel pipe) at once
        rather than at garbage collection; processes that survived SIGKILL are left to the
        kernel."""
        self.stop_heartbeats()
        for proc, exited in zip(self.processes, self.exited, strict=True):
            if not exited.done():
                self.loop.remove_reader(proc.sentinel)
            elif proc.exitcode is not None:
                proc.close()
        _live.discard(self)


def _kill_leftovers() -> None:
    """At interpreter exit: workers of groups nobody shut down must not outlive us."""
    for liveness in list(_live):
        for proc in liveness.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)


launch.register_exit_hook(_kill_leftovers)
