"""Dead, silent and misbehaving workers; startup failures; shutdown and orphans; bad input on the wire."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from energon.actors import ActorGroup, protocol, transport
from energon.errors import RemoteError, WorkerFailed

from .conftest import eventually, process_gone
from .sample_actors import Echo, FailsToStart

BOTH_LOOPS = True
pytestmark = pytest.mark.timeout(60)
HEARTBEAT = 1.0  # seconds; every failure below must be reported within this bound (plus slack)


async def spawn(n=2, **kwargs) -> ActorGroup:
    return await ActorGroup.spawn(Echo, n, heartbeat_timeout=HEARTBEAT, **kwargs)


async def test_worker_killed_mid_call_fails_its_calls_within_the_bound():
    async with await spawn() as group:
        failures = []
        group.add_failure_callback(failures.append)
        pid = await group[1].call("pid")
        calls = [group[1].call("sleep", 30), group[1].call("aecho", 1, delay=30)]
        await group[1].call("aecho", None)  # both calls have reached the worker
        start = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for call in calls:
            with pytest.raises(WorkerFailed) as info:
                await asyncio.wait_for(call, HEARTBEAT + 1)
            assert info.value.rank == 1
        assert time.monotonic() - start < HEARTBEAT + 1
        assert (await asyncio.wait_for(group.wait_failed(), 1)).rank == 1
        assert [f.rank for f in failures] == [1] and not group.is_alive(1)
        with pytest.raises(WorkerFailed):
            await group[1].call("ping")  # later calls fail at once
        assert await group[0].call("echo", "still here") == "still here"


async def test_spawned_worker_ignores_sigint_so_the_controller_decides_when_it_stops():
    # Ctrl-C in a terminal signals the whole process group; the workers must outlive it so
    # the controller can drain in-flight requests before shutting them down.
    async with await spawn(1) as group:
        pid = await group[0].call("pid")
        os.kill(pid, signal.SIGINT)
        assert await group[0].call("echo", "after SIGINT") == "after SIGINT"
        assert group.is_alive(0)


async def test_silent_worker_is_failed_after_heartbeat_timeout_and_killed():
    async with await spawn() as group:
        pid = await group[0].call("pid")
        call = group[0].call("aecho", "never", delay=30)
        os.kill(pid, signal.SIGSTOP)  # alive but silent
        try:
            start = time.monotonic()
            with pytest.raises(WorkerFailed, match="heartbeat"):
                await asyncio.wait_for(call, HEARTBEAT * 3)
            assert time.monotonic() - start < HEARTBEAT * 2
            assert await eventually(lambda: process_gone(pid), 5)
        finally:
            if not process_gone(pid):
                os.kill(pid, signal.SIGKILL)


async def test_long_sync_method_does_not_stop_heartbeats():
    async with await spawn(1) as group:
        assert await group[0].call("sleep", HEARTBEAT * 2.5, "done") == "done"
        assert group.failure is None


async def test_worker_that_exits_fails_its_calls_with_the_exit_code():
    async with await spawn(1) as group:
        with pytest.raises(WorkerFailed, match="code 3"):
            await asyncio.wait_for(group[0].call("exit_now", 3), HEARTBEAT + 1)


async def test_constructor_error_raises_remote_error_and_leaves_no_process():
    with pytest.raises(RemoteError) as info:
        await ActorGroup.spawn(FailsToStart, 2, args=("bad config",))
    assert (info.value.remote_type, info.value.message) == ("RuntimeError", "bad config")
    assert multiprocessing.active_children() == []


async def test_unimportable_actor_raises_remote_error():
    with pytest.raises(RemoteError) as info:
        await ActorGroup.spawn("no_such_module_xyz:Actor", 1)
    assert info.value.remote_type == "ModuleNotFoundError"
    assert multiprocessing.active_children() == []


async def test_shutdown_leaves_no_process_and_fails_later_calls():
    group = await spawn()
    pids = await group.broadcast("pid")
    await group.shutdown()
    await group.shutdown()  # idempotent
    assert all(process_gone(pid) for pid in pids)
    assert multiprocessing.active_children() == []
    with pytest.raises(WorkerFailed, match="shut down"):
        await group[0].call("ping")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc (Linux)")
async def test_shutdown_releases_every_descriptor_without_waiting_for_the_garbage_collector():
    import gc

    await (await spawn()).shutdown()  # a first group: the loop and zmq set up what they keep
    gc.collect()
    before = open_fds()
    gc.disable()  # what is released must be released by shutdown itself
    try:
        group = await spawn(3)
        await group.broadcast("ping")
        await group.shutdown()
        assert open_fds() - before == set()
    finally:
        gc.enable()


async def test_shutdown_with_a_stuck_sync_call_fails_it_and_still_ends_the_process():
    group = await spawn(1)
    pid = await group[0].call("pid")
    stuck = group[0].call("sleep", 600)
    start = time.monotonic()
    await group.shutdown(timeout=1.0)
    assert time.monotonic() - start < 5
    with pytest.raises(WorkerFailed):
        await stuck
    assert process_gone(pid)


CONTROLLER = """
import asyncio, sys
sys.path.insert(0, {tests!r})
from energon.actors import ActorGroup
from actors.sample_actors import Echo

async def main():
    group = await ActorGroup.spawn(Echo, 2)
    print(*await group.broadcast("pid"), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_sigkilled_controller_leaves_no_orphans():
    code = textwrap.dedent(CONTROLLER.format(tests=str(Path(__file__).parents[1])))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2 and not any(process_gone(p) for p in pids)
    proc.kill()
    await proc.wait()
    assert await eventually(lambda: all(process_gone(p) for p in pids), 5)


UNGUARDED = """
import asyncio, sys
sys.path.insert(0, {tests!r})
from actors.sample_actors import Echo
from energon.actors import ActorGroup

async def main():
    async with await ActorGroup.spawn(Echo, 1) as group:
        print(await group.call(0, "echo", "up"))

asyncio.run(main())  # no `if __name__ == "__main__":`
"""


def test_a_script_without_a_main_guard_is_told_the_fix(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(UNGUARDED.format(tests=str(Path(__file__).parents[1])))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "energon.errors.WorkerFailed: worker 0 failed: process exited with code 78"
    )
    assert 'put that under `if __name__ == "__main__":`' in last


# ------------------------------------------------------------------------ bad input on the wire

# Forged ids stay far above the ids this test's controller gives its own calls: a garbled call
# that the worker answers with an error for id N would otherwise resolve the controller's own
# call N, when it comes from the controller's socket (as these do) indistinguishable from it.
frames_strategy = st.lists(
    st.binary(max_size=40)
    | st.builds(
        msgpack.packb,
        st.fixed_dictionaries(
            {"v": st.sampled_from([1, 2, "1"]), "id": st.integers(2**20, 2**40) | st.text(max_size=3),
             "kind": st.sampled_from(sorted(protocol.KINDS - {"shutdown"}) + ["zap"]), "method": st.sampled_from(["echo", None, 3]),
             "meta": st.dictionaries(st.sampled_from(["args", "kwargs", "result"]), st.lists(st.integers(-9, 9), max_size=2), max_size=3)}
        ),
    ),
    min_size=1,
    max_size=3,
)  # fmt: skip


@pytest.mark.timeout(120)
async def test_fuzzed_frames_to_workers_and_controller_are_counted_and_harmless():
    # hypothesis runs its examples synchronously, holding the controller's loop (and so its
    # heartbeats) for as long as they take on a busy machine: a long timeout keeps the worker.
    async with await ActorGroup.spawn(Echo, 1, heartbeat_timeout=60.0) as group:
        rogue = group._ctx.socket(transport.zmq.DEALER)  # a stranger connecting to the controller
        rogue.setsockopt(transport.zmq.IDENTITY, b"stranger")
        rogue.connect(group.address)
        sent = []

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(frames_strategy, st.sampled_from(["io", "sync"]))
        def send_garbage(frames, channel):
            # straight onto the controller's ROUTER, addressed to worker 0's channel
            transport.send(group._sock, [protocol.identity(0, channel), *frames])
            transport.send(rogue, frames)
            sent.append(frames)

        try:
            send_garbage()
            await check_still_serving(group, sent)
        finally:
            rogue.close(0)


async def check_still_serving(group, sent):
    """Both sides counted the garbage, stayed up, and still answer calls."""
    stats_before, late_before = (
        await group[0].call("__energon_stats__"),
        group.stats()["late_replies"],
    )
    # a call whose header names a payload frame that never arrived is answered with an error
    head = protocol.encode("call", 0, "echo", {"args": [b"x" * 70_000], "kwargs": {}})[0]
    transport.send(group._sock, [protocol.identity(0, "io"), head])
    assert await group[0].call("echo", "alive") == "alive"
    assert await eventually(lambda: group.stats()["invalid"] >= len(sent), 5)
    stats = await group[0].call("__energon_stats__")
    assert stats["invalid"] >= stats_before["invalid"] + 1
    assert group.stats()["late_replies"] >= late_before + 1  # the error reply, for an id not asked
    assert group.failure is None and group.stats()["in_flight"] == 0
