"""Recovery: a worker that dies fails the requests it was running (WorkerFailed), or, with
retry_on_failure, runs those without output again once; the Engine restarts its workers, with
bounded attempts and backoff, reports "degraded" meanwhile and then serves Hugging Face's greedy
tokens again. Workers are killed for real (SIGKILL). Each test owns its Engine."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import (  # noqa: F401 (one_torch_thread: autouse)
    assert_greedy_equal,
    hf_greedy,
    hf_logits_of,
    hf_processed_greedy,
    make_llama,
    one_torch_thread,
    workers,
)

from energon import Engine, SamplingParams, WorkerFailed
from energon.recovery import Recovery
from energon.scheduler import Scheduler

pytestmark = pytest.mark.timeout(240)

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 3, 7, 11, 2]
LONG_PROMPT = [2 + (7 * i) % 120 for i in range(160)]  # 10 prefill steps of 16 tokens


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder, hf_model) of a tiny random Llama without tokenizer.json."""
    folder = tmp_path_factory.mktemp("llama")
    return folder, make_llama(folder)


@pytest.fixture
def ipc_dir(tmp_path, monkeypatch):
    """The folder where this test's worker groups put their ipc sockets."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def kill(rank: int) -> int:
    """SIGKILLs this process's live worker of `rank`; returns its pid."""
    (proc,) = [p for p in workers() if p.name == f"energon-worker-{rank}"]
    os.kill(proc.pid, signal.SIGKILL)
    return proc.pid


async def drain(stream) -> None:
    async for _ in stream:
        pass


async def kill_and_notice(engine: Engine) -> None:
    """Kills rank 0; returns once the Engine has taken note (it is restarting)."""
    group = engine.group
    kill(0)
    await asyncio.wait_for(group.wait_failed(), 10)
    await asyncio.sleep(0)  # the group's failure callbacks, scheduled before this task woke, run
    assert engine.health == "degraded"


async def fail_a_running_request(engine: Engine) -> None:
    """Kills rank 0 while a request generates; returns once that request failed, i.e. once the
    Engine knows and is restarting."""
    stream = engine.stream(PROMPT, SamplingParams(max_tokens=1000, **GREEDY))
    await stream.__anext__()
    kill(0)
    with pytest.raises(WorkerFailed):
        await drain(stream)
    assert engine.health == "degraded"


async def test_killed_worker_fails_its_requests_then_the_engine_restarts_and_serves_again(
    llama, ipc_dir
):
    folder, hf = llama
    ref = hf_greedy(hf, PROMPT, 8)
    before = workers()
    engine = await Engine(str(folder), pp=2, device="cpu", restart_backoff=0.0).start()
    try:
        first = {p.pid for p in workers() - before}
        stream = engine.stream(PROMPT, SamplingParams(max_tokens=1000, **GREEDY))
        await stream.__anext__()  # generating
        kill(1)
        with pytest.raises(WorkerFailed) as info:
            await drain(stream)
        assert info.value.rank == 1
        assert engine.health == "degraded"
        await asyncio.wait_for(engine.recovery.wait(), 120)
        assert engine.health == "ok"
        stats = engine.stats()
        assert (stats["restarts"], stats["worker_failures"], stats["restart_failures"]) == (1, 1, 0)
        second = {p.pid for p in workers() - before}
        assert len(second) == 2 and not second & first  # a new group; the old one is reaped
        assert len(list(ipc_dir.glob("energon-*"))) == 1  # the old group's sockets are gone
        done = await engine.infer(PROMPT, SamplingParams(max_tokens=8, **GREEDY))
        assert_greedy_equal(done.token_ids, ref)
    finally:
        await engine.shutdown()
    assert workers() == before
    assert list(ipc_dir.glob("energon-*")) == []


async def until_scheduled(engine: Engine, prompt: list[int], timeout: float = 30.0) -> None:
    """Returns once the Engine has sent a step with the request of `prompt` (controller state,
    set in this process by the step loop: checked after each turn of the loop)."""
    request = next(r for r in engine._requests.values() if r.prompt_ids == prompt and not r.done)
    deadline = asyncio.get_running_loop().time() + timeout
    while request.first_scheduled is None:
        assert asyncio.get_running_loop().time() < deadline, "the request was never scheduled"
        await asyncio.sleep(0.001)


async def test_with_retry_on_failure_a_request_without_output_runs_again_once(llama):
    folder, hf = llama
    # penalised: the new workers rebuild its token counts from the step that samples it first
    params = SamplingParams(max_tokens=4, repetition_penalty=1.5, **GREEDY)
    ref = hf_processed_greedy(hf, LONG_PROMPT, params)
    engine = Engine(
        str(folder), device="cpu", max_batch_tokens=16, retry_on_failure=True, restart_backoff=0
    )
    async with engine:
        talking = engine.stream(PROMPT, SamplingParams(max_tokens=1000, **GREEDY))
        await talking.__anext__()  # has output
        silent = asyncio.ensure_future(engine.infer(LONG_PROMPT, params))
        await asyncio.sleep(0)  # submitted; the long prompt needs 11 steps to prefill
        await talking.__anext__()  # the step after this one runs the long prompt's first chunk
        # ... once the controller has sent it: only a request some worker has seen is put back
        # (one not yet scheduled just keeps its place); that send can come after the token
        await until_scheduled(engine, LONG_PROMPT)
        assert not silent.done()
        kill(0)
        with pytest.raises(WorkerFailed):  # output was streamed: it cannot run again
            await drain(talking)
        done = await asyncio.wait_for(silent, 120)  # ran again on the new workers
        assert_greedy_equal(done.token_ids, ref)
        assert (engine.stats()["retried_requests"], engine.stats()["restarts"]) == (1, 1)

        # Once only: a request put back fails if the new workers die before it has output.
        # Not LONG_PROMPT again: its blocks are cached now, so its one prefill step could return
        # a token before the kill lands (then it fails for having output, put back or not).
        other = LONG_PROMPT[1:] + LONG_PROMPT[:1]
        again = asyncio.ensure_future(engine.infer(other, params))
        await asyncio.sleep(0)
        await until_scheduled(engine, other)
        await kill_and_notice(engine)
        await asyncio.wait_for(engine.recovery.wait(), 120)  # put back, scheduled at once
        assert not again.done() and engine.stats()["retried_requests"] == 2
        kill(0)
        with pytest.raises(WorkerFailed):
            await asyncio.wait_for(again, 120)
        await asyncio.wait_for(engine.recovery.wait(), 120)
        assert engine.stats()["restarts"] == 3 and engine.health == "ok"


async def test_while_restarting_health_is_degraded_and_new_calls_wait_for_the_workers(llama):
    aiohttp = pytest.importorskip("aiohttp")
    pytest.importorskip("prometheus_client")
    from energon.server.frontend import Frontend
    from energon.server.http_door import HttpDoor

    folder, hf = llama
    ref = hf_greedy(hf, PROMPT, 8)
    engine = Engine(str(folder), device="cpu", restart_backoff=0.5)
    async with engine, aiohttp.ClientSession() as http:
        door = HttpDoor(Frontend(engine), port=0)
        url = await door.start()
        try:
            stream = engine.stream(PROMPT, SamplingParams(max_tokens=1000, **GREEDY))
            await stream.__anext__()
            kill(0)
            with pytest.raises(WorkerFailed):
                await drain(stream)
            async with http.get(url + "/health") as resp:
                assert resp.status == 503
                degraded = await resp.json()
            assert degraded["status"] == "degraded" and "worker 0 failed" in degraded["reason"]
            late = asyncio.ensure_future(
                engine.infer(PROMPT, SamplingParams(max_tokens=8, **GREEDY))
            )
            forward = asyncio.ensure_future(engine.forward([PROMPT]))
            done = await asyncio.wait_for(late, 120)  # queued, then run by the new workers
            assert_greedy_equal(done.token_ids, ref)
            (logits,) = await asyncio.wait_for(forward, 120)  # waited for the new workers
            torch.testing.assert_close(logits, hf_logits_of(hf, PROMPT), atol=1e-4, rtol=0)
            async with http.get(url + "/health") as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "ok", "restarts": 1, "model": str(folder)}
            async with http.get(url + "/metrics") as resp:
                metrics = await resp.text()
            for line in (
                "energon_worker_restarts_total 1.0",
                "energon_worker_failures_total 1.0",
                "energon_worker_restart_failures_total 0.0",
                'energon_health{state="ok"} 1.0',
                'energon_health{state="degraded"} 0.0',
            ):
                assert line in metrics.splitlines(), line
        finally:
            await door.close()


class KillsWhileLoading(Engine):
    """An Engine whose restarted groups lose their rank 0 (a real SIGKILL) right after they
    spawn, `kills` times: a second failure during recovery."""

    kills = 0

    async def _spawn(self) -> None:
        await super()._spawn()
        if self.recovery.restarting and self.kills > 0:
            self.kills -= 1
            kill(0)


async def test_a_worker_lost_while_restarting_costs_one_more_attempt_after_a_longer_backoff(
    llama, caplog
):
    caplog.set_level(logging.WARNING, logger="energon")
    folder, hf = llama
    ref = hf_greedy(hf, PROMPT, 8)
    engine = KillsWhileLoading(str(folder), device="cpu", max_restarts=3, restart_backoff=0.2)
    engine.kills = 1
    async with engine:
        await fail_a_running_request(engine)
        waiting = asyncio.ensure_future(
            engine.infer(PROMPT, SamplingParams(max_tokens=8, **GREEDY))
        )
        done = await asyncio.wait_for(waiting, 120)
        assert_greedy_equal(done.token_ids, ref)
        stats = engine.stats()
        assert (stats["restarts"], stats["restart_failures"], stats["health"]) == (1, 1, "ok")
    lines = [r.getMessage() for r in caplog.records]
    assert "energon: restart 1 of at most 3 in a row in 0.2 s" in lines
    assert "energon: restart 2 of at most 3 in a row in 0.4 s" in lines


async def test_after_max_restarts_in_a_row_the_engine_fails_for_good_and_leaves_no_process(llama):
    before = workers()
    engine = KillsWhileLoading(str(llama[0]), device="cpu", max_restarts=2, restart_backoff=0)
    engine.kills = 10
    await engine.start()
    try:
        await fail_a_running_request(engine)
        waiting = asyncio.ensure_future(engine.infer(PROMPT, SamplingParams(max_tokens=8)))
        with pytest.raises(WorkerFailed):
            await asyncio.wait_for(waiting, 120)
        assert engine.health == "failed"
        assert engine.health_report()["reason"].startswith("worker 0 failed")
        assert (engine.stats()["restarts"], engine.stats()["restart_failures"]) == (0, 2)
        assert workers() == before  # every group it started is gone already
        with pytest.raises(WorkerFailed):
            await engine.infer(PROMPT)
    finally:
        await engine.shutdown()
    assert workers() == before


def test_a_new_scheduler_goes_on_counting_preemptions_from_the_one_it_replaces():
    old = Scheduler(8, 4)
    old.num_preemptions = 5
    engine = SimpleNamespace(scheduler=old, _requests={})
    new = Recovery(engine)._move_to(Scheduler(8, 4))
    assert new.num_preemptions == 5 and new is not old
