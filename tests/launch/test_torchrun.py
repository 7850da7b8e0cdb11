"""launcher="external": the controller waits for workers that a cluster launcher started, here
torchrun (`python -m torch.distributed.run`), each `energon worker --controller tcp://...` taking
its rank from the launcher's environment."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest
from launch_helpers import generate_all, worker_command, worker_env

from energon import Engine, RemoteError, WorkerFailed
from energon.actors.transport import free_port

pytestmark = pytest.mark.timeout(90)


@contextlib.asynccontextmanager
async def running(*cmd: str, env: dict[str, str]):
    """The process of cmd for the body of the block; killed at the end if it still runs."""
    proc = await asyncio.create_subprocess_exec(*cmd, env=env)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_workers_started_by_torchrun_generate_what_one_host_generates(llama, one_host):
    # tp=2, pp=1: the pipeline cut does not change the arithmetic (the same shards, the same
    # float32 activations between stages), so the tokens equal the one-host tp=2, pp=2 run's.
    # The controller binds every interface; the workers reach it, and its rendezvous, through
    # the address they were given.
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    torchrun = running(
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", *worker_command(address)[2:],
        env=worker_env(),
    )  # fmt: skip
    async with torchrun as proc:
        engine = Engine(
            str(llama[0]),
            tp=2,
            pp=1,
            device="cpu",
            launcher="external",
            address=f"tcp://*:{port}",
            start_timeout=60,
            progress=False,
        )
        async with engine:
            assert await generate_all(engine) == one_host
        assert await asyncio.wait_for(proc.wait(), 30) == 0  # every worker exited cleanly


async def test_a_launcher_that_started_another_number_of_workers_is_told_so(llama):
    address = f"tcp://127.0.0.1:{free_port()}"
    async with running(
        *worker_command(address), env=worker_env(RANK="0", WORLD_SIZE="3")
    ) as worker:
        engine = Engine(
            str(llama[0]),
            device="cpu",
            launcher="external",
            address=address,
            start_timeout=60,
            progress=False,
        )
        with pytest.raises(
            RemoteError,
            match=r"started 3 workers \(WORLD_SIZE=3\) but the controller serves tp \* pp = 1",
        ):
            await engine.start()
        assert await asyncio.wait_for(worker.wait(), 10) == 0


async def test_missing_ranks_are_named_after_the_start_timeout(llama):
    address = f"tcp://127.0.0.1:{free_port()}"
    async with running(
        *worker_command(address), env=worker_env(RANK="1", WORLD_SIZE="2")
    ) as worker:
        engine = Engine(
            str(llama[0]),
            tp=2,
            device="cpu",
            launcher="external",
            address=address,
            start_timeout=2,
            progress=False,
        )
        with pytest.raises(WorkerFailed) as info:
            await engine.start()
        assert info.value.rank == 0
        message = str(info.value)
        assert f"ranks [0] of 2 did not connect to {address} within 2s" in message
        assert f"energon worker --controller {address}" in message
        assert await asyncio.wait_for(worker.wait(), 10) == 0  # the one that came is let go
