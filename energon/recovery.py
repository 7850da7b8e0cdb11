"""Surviving worker loss: the Engine replaces its worker group and serves again.

A worker that dies, or a step that fails on a group of several workers (the others may be left
waiting in a collective that never completes), ends the group, not the Engine:

1. At once, the requests the group was running fail with the error (`WorkerFailed`, naming the
   rank). With `retry_on_failure=True` those that produced no output yet are put back instead,
   once per request. Requests no worker has seen yet keep their place in the queue.
2. The old group is shut down: its processes reaped (SIGKILL after a short grace), its ipc socket
   folder removed, its shared-memory segments unmapped, pooled memory given back.
3. After a backoff (`restart_backoff * 2**(n-1)` seconds before the n-th restart in a row, at
   most MAX_BACKOFF_S), a new group is spawned, loads its shards and sizes its KV cache: the
   phases of `Engine.start`, each bounded by `start_timeout`.
4. The waiting requests move, in arrival order, to a fresh Scheduler over the new cache, and
   serving resumes.

Meanwhile `Engine.health` is "degraded" and new requests queue (up to `max_waiting`, then
`Overloaded`). A restart that fails (a worker dies while loading, a timeout, ...) counts as one
more restart in a row, and so does a new group that fails before it completes a step. After
`max_restarts` in a row the Engine fails for good ("failed"): every request and every later call
raise the last error. `max_restarts=0` makes the first failure final.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from energon.errors import EnergonError, InvalidRequest
from energon.sequence import Sequence as SchedSequence
from energon.startup import StartupProgress

log = logging.getLogger("energon")

MAX_BACKOFF_S = 60.0  # the longest wait before a restart
RETIRE_GRACE_S = 2.0  # a failed group's surviving workers get this long to exit, then SIGTERM/KILL
RETIRE_TIMEOUT_S = 30.0  # bound on shutting a failed group down (the reaping itself is bounded)


class Recovery:
    """The Engine's restart policy and its state. The Engine calls `on_failure` (on its loop) for
    every failure of its serving group, `served` for every step that comes back, `forget` for
    every request it drops and `stop` at shutdown. Raises InvalidRequest for a bad argument."""

    def __init__(
        self,
        engine,
        *,
        retry_on_failure: bool = False,
        max_restarts: int = 3,
        restart_backoff: float = 1.0,
    ):
        if retry_on_failure not in (True, False):
            raise InvalidRequest(
                "retry_on_failure", f"must be True or False (got {retry_on_failure!r})"
            )
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise InvalidRequest("max_restarts", f"must be an int >= 0 (got {max_restarts!r})")
        if (
            isinstance(restart_backoff, bool)
            or not isinstance(restart_backoff, int | float)
            or not math.isfinite(restart_backoff)
            or not 0 <= restart_backoff <= MAX_BACKOFF_S
        ):
            raise InvalidRequest(
                "restart_backoff",
                f"must be a number of seconds in [0, {MAX_BACKOFF_S:g}] (got {restart_backoff!r})",
            )
        self.engine = engine
        self.retry_on_failure = bool(retry_on_failure)
        self.max_restarts = max_restarts
        self.restart_backoff = float(restart_backoff)
        self.restarts = 0  # restarts that brought the workers back
        self.worker_failures = 0  # failures of a serving group
        self.restart_failures = 0  # restarts that did not bring the workers back
        self.retried_requests = 0  # requests put back after a failure
        self.failure: EnergonError | None = None  # what the restart in progress recovers from
        self.restarting = False
        self._in_a_row = 0  # restarts since a group last completed a step
        self._retried: set[int] = set()  # seq ids put back once already
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------------------ hooks

    def watch(self, group) -> None:
        """Reports `group`'s worker failures while it is the Engine's serving group. The Engine
        watches each group from its spawn on; failures while it starts are raised by the
        start-up calls instead."""
        group.add_failure_callback(lambda exc: self._group_failed(group, exc))

    def _group_failed(self, group, exc: EnergonError) -> None:
        if group is self.engine.group:
            self.on_failure(exc)

    def served(self) -> None:
        """A step came back: the group works, the next failure starts a new count."""
        self._in_a_row = 0

    def forget(self, seq_id: int) -> None:
        self._retried.discard(seq_id)

    def on_failure(self, exc: EnergonError) -> None:
        """The serving group failed with `exc`: fail or put back its requests now, then replace
        it in a task (or fail the Engine for good when no restart is allowed)."""
        engine = self.engine
        if not engine._started or engine._closed or engine._failure is not None:
            return  # starting (start() raises), shutting down, or failed for good
        if self.restarting:
            return  # already replacing this group
        self.worker_failures += 1
        if self.max_restarts == 0:
            engine._fail_for_good(exc)
            return
        self.restarting = True
        self.failure = exc
        # Exceptions are logged as text: a kept record must not keep a dead group alive through
        # the exception's traceback.
        log.error("energon: %s; restarting the workers", str(exc))
        current = asyncio.current_task()
        for task in list(engine._steps):  # steps of the dead group never come back
            if task is not current:
                task.cancel()
        engine._steps.clear()
        self._triage(exc)
        # New requests queue here until the new group is up; the old cache's size bounds them.
        engine.scheduler = self._move_to(engine._new_scheduler(engine.scheduler.blocks.num_blocks))
        self._task = asyncio.ensure_future(self._restart(exc))

    async def wait(self) -> None:
        """Returns once no restart is in progress (it ended either way); never raises."""
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def stop(self) -> None:
        """Ends a restart in progress (at shutdown): the group it was spawning is shut down by
        the spawn itself, or left in `engine.group` for the Engine to shut down."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=RETIRE_TIMEOUT_S)
        self.restarting = False

    # ------------------------------------------------------------------------------ requests

    def _triage(self, exc: EnergonError) -> None:
        """Fails the requests a worker of the failed group ran, except those put back."""
        for req in list(self.engine._requests.values()):
            if req.done or req.first_scheduled is None:
                continue  # no worker has seen it: it keeps its place
            if self.retry_on_failure and not req.token_ids and req.seq_id not in self._retried:
                self._retried.add(req.seq_id)
                self.retried_requests += 1
                continue
            req.abort(exc)

    def _move_to(self, scheduler):
        """Adds every live request to `scheduler` in arrival order; returns it. A request that
        no longer fits (a smaller cache, a full queue) fails with the scheduler's error. The
        preemption and prefix-cache counts go on from the scheduler it replaces (counters of the
        metrics); the prefix cache does not (the new workers' caches are empty)."""
        old = self.engine.scheduler
        scheduler.num_preemptions += old.num_preemptions
        scheduler.blocks.hit_tokens += old.blocks.hit_tokens  # the cache itself is gone
        scheduler.blocks.queried_tokens += old.blocks.queried_tokens
        for req in sorted(self.engine._requests.values(), key=lambda r: r.seq_id):
            if req.done:
                continue
            try:
                scheduler.add(SchedSequence(req.seq_id, req.prompt_ids, req.params.max_tokens))
            except EnergonError as err:
                req.abort(err)
        return scheduler

    # ------------------------------------------------------------------------------ restarting

    async def _restart(self, exc: EnergonError) -> None:
        try:
            error = await self._restart_in_a_row(exc)
        except asyncio.CancelledError:
            raise  # shutdown
        except Exception as err:  # a bug here must fail the Engine, not leave it degraded
            log.exception("energon: restarting the workers raised")
            error = err
        if error is None:
            return
        self.restarting = False
        if not isinstance(error, EnergonError):
            error = EnergonError(f"restarting the workers failed: {error!r}")
        self.engine._fail_for_good(error)

    async def _restart_in_a_row(self, exc: EnergonError) -> BaseException | None:
        """Retires the failed group and starts new ones until one is up; returns None then, or
        the last error once max_restarts restarts in a row are spent."""
        engine = self.engine
        error: BaseException = exc
        while True:
            await self._retire(engine.group)
            if self._in_a_row >= self.max_restarts:
                log.error(
                    "energon: giving up after %d restart(s) in a row: %s",
                    self._in_a_row,
                    str(error),
                )
                return error
            self._in_a_row += 1
            delay = min(self.restart_backoff * 2 ** (self._in_a_row - 1), MAX_BACKOFF_S)
            log.warning(
                "energon: restart %d of at most %d in a row in %.1f s",
                self._in_a_row,
                self.max_restarts,
                delay,
            )
            if delay > 0:
                await asyncio.sleep(delay)  # backoff: a deliberate pause, not a wait for state
            t0 = time.perf_counter()
            world = engine.tp * engine.pp
            try:
                num_blocks = await engine._bring_up(StartupProgress(2 * world + 1, bar=False))
            except asyncio.TimeoutError:
                error = EnergonError(
                    f"the restarted workers did not finish loading within "
                    f"start_timeout={engine.start_timeout}s"
                )
                log.error("energon: %s", error)
                self.restart_failures += 1
                continue
            except Exception as err:  # a worker died while loading, a rank raised, ...
                error = err
                log.error("energon: restarting the workers failed: %s", str(err))
                self.restart_failures += 1
                continue
            if engine.group.failure is not None:  # died after loading (reported, but ignored)
                error = engine.group.failure
                self.restart_failures += 1
                continue
            self._resume(num_blocks, time.perf_counter() - t0)
            return None

    def _resume(self, num_blocks: int, seconds: float) -> None:
        """The new group is up: its scheduler takes the waiting requests; serving resumes."""
        engine = self.engine
        engine.scheduler = self._move_to(engine._new_scheduler(num_blocks))
        self.restarts += 1
        self.restarting = False
        self.failure = None
        log.warning(
            "energon: the workers are back after %.1f s (restart %d); serving again",
            seconds,
            self.restarts,
        )
        engine._kick()

    async def _retire(self, group) -> None:
        """Shuts a failed (or half-started) group down, bounded in time; idempotent."""
        await self.engine._close_pool()
        if group is None:
            return
        try:
            await asyncio.wait_for(group.shutdown(timeout=RETIRE_GRACE_S), RETIRE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning("energon: the failed workers took over %gs to stop", RETIRE_TIMEOUT_S)
