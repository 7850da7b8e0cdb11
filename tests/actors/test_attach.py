"""Workers started elsewhere (`energon worker --controller tcp://... --rank R`) attach to a controller."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from energon.actors import ActorGroup
from energon.actors.transport import free_port
from energon.errors import WorkerFailed

pytestmark = pytest.mark.timeout(60)
TESTS = str(Path(__file__).parents[1])


async def start_worker(address: str, rank: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "energon.cli", "worker", "--controller", address, "--rank", str(rank),
        env={"PYTHONPATH": TESTS, "PATH": ""},
    )  # fmt: skip


async def test_attached_workers_serve_calls_and_exit_on_shutdown():
    address = f"tcp://127.0.0.1:{free_port()}"
    workers = [await start_worker(address, r) for r in (1, 0)]  # any order, before the controller
    group = await ActorGroup.attach(
        "actors.sample_actors:Echo", 2, address=address, args=("remote",), start_timeout=30
    )
    try:
        assert await group.broadcast("whoami") == [
            {"rank": r, "world_size": 2, "address": address} for r in range(2)
        ]
        assert await group[1].call("init_args") == {"tag": "remote", "scale": 1}
    finally:
        await group.shutdown()
    codes = await asyncio.wait_for(asyncio.gather(*(w.wait() for w in workers)), 10)
    assert codes == [0, 0]


async def test_attach_names_the_ranks_that_never_connected():
    address = f"tcp://127.0.0.1:{free_port()}"
    worker = await start_worker(address, 0)
    with pytest.raises(WorkerFailed, match=r"\[1\] did not connect") as info:
        await ActorGroup.attach("actors.sample_actors:Echo", 2, address=address, start_timeout=2)
    assert info.value.rank == 1
    assert await asyncio.wait_for(worker.wait(), 10) == 0  # told to go home


async def test_attached_worker_exits_when_the_controller_goes_silent():
    address = f"tcp://127.0.0.1:{free_port()}"
    worker = await start_worker(address, 0)
    group = await ActorGroup.attach(
        "actors.sample_actors:Echo", 1, address=address, heartbeat_timeout=1.0, start_timeout=30
    )
    try:
        group._liveness.stop_heartbeats()  # the controller stops heartbeating, as if it had hung or died
        assert await asyncio.wait_for(worker.wait(), 10) == 3
    finally:
        await group.shutdown(timeout=0.5)
