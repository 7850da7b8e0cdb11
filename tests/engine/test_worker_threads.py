"""Each Engine worker sets torch's intra-op CPU threads itself (energon.runner.worker_threads): an
OMP_NUM_THREADS in a spawned worker's environment arrives after torch is loaded, too late."""

from __future__ import annotations

import os

import pytest
import torch

from energon import Engine
from energon.runner import worker_threads

CORES = len(os.sched_getaffinity(0))


def test_cuda_workers_take_one_thread_and_cpu_workers_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_threads(torch.device("cuda", 0), 4) == 1
    assert worker_threads(torch.device("cpu"), 1) == CORES
    assert worker_threads(torch.device("cpu"), 2 * CORES) == 1  # never 0


@pytest.mark.parametrize("value, want", [("3", 3), ("0", None), ("many", None)])
def test_an_omp_num_threads_the_user_set_wins_when_it_is_a_count(monkeypatch, value, want):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    assert worker_threads(torch.device("cuda", 0), 2) == (want or 1)


@pytest.mark.asyncio
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "worker_env, want", [({}, max(1, CORES // 2)), ({"OMP_NUM_THREADS": "3"}, 3)]
)
async def test_engine_workers_run_with_those_threads(monkeypatch, worker_env, want):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    async with Engine("tiny", tp=2, device="cpu", worker_env=worker_env) as engine:
        infos = await engine.group.broadcast("info")
    assert [i["cpu_threads"] for i in infos] == [want, want]
