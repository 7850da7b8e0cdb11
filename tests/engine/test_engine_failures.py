"""The Engine's life: start-up (progress, errors), a worker killed mid-generation with restarts
turned off, shutdown, and living inside someone else's server (aiohttp on uvloop). Each test owns
its Engine. Recovery (restarts after a worker dies) is tests/engine/test_recovery.py."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import time

import pytest
from engine_helpers import (  # noqa: F401 (one_torch_thread: autouse)
    assert_greedy_equal,
    hf_greedy,
    make_llama,
    one_torch_thread,
    workers,
)

from energon import CheckpointError, Engine, InvalidRequest, SamplingParams, WorkerFailed
from energon.startup import StartupProgress

pytestmark = pytest.mark.timeout(60)

GREEDY = dict(temperature=0.0, ignore_eos=True)
PROMPT = [5, 9, 3, 7, 11, 2]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(folder, hf_model) of a tiny random Llama without tokenizer.json."""
    folder = tmp_path_factory.mktemp("llama")
    return folder, make_llama(folder)


# ---------------------------------------------------------------------------- start-up


async def test_start_reports_each_phase_and_each_rank_in_log_lines(llama, caplog):
    caplog.set_level(logging.INFO, logger="energon")
    async with Engine(str(llama[0]), tp=2, device="cpu", progress=False):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "energon"]
    phases = ["spawning 2 worker(s)", "2 worker(s) up", "loading shards", "sizing the KV cache"]
    at = [next(i for i, line in enumerate(lines) if p in line) for p in phases]
    assert at == sorted(at)
    loaded = [line for line in lines if " loaded layers 0-2 " in line]
    assert sorted(line.split()[2] for line in loaded) == ["0", "1"]  # "energon: worker R ..."
    assert "KV cache of" in lines[-2] and lines[-1].startswith("energon: ready in")


def test_progress_bar_redraws_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    progress = StartupProgress(total=5, stream=out)
    progress.phase("spawning workers", "")
    progress.advance("2 up", units=2)
    progress.phase("loading shards", "")
    progress.advance("worker 1 loaded")
    progress.finish("ready in 1.0 s")
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("energon: ready in 1.0 s\n")
    drawn = text.split("\r\x1b[2K")[1:]
    assert drawn[0].startswith("energon [" + "-" * 24 + "] 0/5 spawning workers")
    assert drawn[1].startswith("energon [#########" + "-" * 15 + "] 2/5 spawning workers: 2 up")
    assert drawn[3].startswith(
        "energon [##############" + "-" * 10 + "] 3/5 loading shards: worker"
    )


async def test_missing_weights_fail_start_with_checkpoint_error_and_no_process_left(tmp_path):
    make_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        await Engine(str(tmp_path), tp=2, device="cpu").start()
    assert workers() == set()


async def test_unknown_model_fails_start_before_any_process_starts():
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a preset"):
        await Engine("no/such/model", device="cpu").start()
    assert workers() == set()


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("tp", {"tp": 0}),
        ("device", {"device": "tpu"}),
        ("dtype", {"dtype": "int8"}),
        ("kv_cache_memory", {"kv_cache_memory": "lots"}),
        ("max_num_seqs", {"max_num_seqs": 0}),
        ("max_batch_tokens", {"max_batch_tokens": 0}),
        ("max_batch_tokens", {"max_batch_tokens": 4096.0}),
        ("launcher", {"launcher": "slurm"}),
        ("decode_graphs", {"decode_graphs": "always"}),
        ("max_restarts", {"max_restarts": -1}),
        ("max_restarts", {"max_restarts": 1.5}),
        ("retry_on_failure", {"retry_on_failure": "yes"}),
        ("restart_backoff", {"restart_backoff": -1.0}),
        ("restart_backoff", {"restart_backoff": float("nan")}),
        ("kv_reserve", {"kv_reserve": -0.1}),
        ("kv_reserve", {"kv_reserve": 1.01}),
        ("kv_reserve", {"kv_reserve": float("nan")}),
        ("kv_reserve", {"kv_reserve": "all"}),
        ("kv_reserve", {"kv_reserve": True}),
        ("stage_splits", {"pp": 2, "stage_splits": [2]}),
        ("stage_splits", {"pp": 2, "stage_splits": [2, 0]}),
        ("stage_splits", {"pp": 2, "stage_splits": "11"}),
        ("start_timeout", {"start_timeout": "x"}),
        ("start_timeout", {"start_timeout": 0}),
        ("heartbeat_timeout", {"heartbeat_timeout": -1}),
        ("heartbeat_timeout", {"heartbeat_timeout": float("inf")}),
    ],
)
def test_bad_engine_arguments_raise_invalid_request_naming_the_field(field, kwargs):
    with pytest.raises(InvalidRequest) as info:
        Engine("tiny", **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(
    "field,kwargs",
    [("stage_splits", {"pp": 2, "stage_splits": [5, 5]}), ("pp", {"pp": 64})],
)
async def test_a_layout_the_model_cannot_take_fails_start_before_any_process_starts(field, kwargs):
    with pytest.raises(InvalidRequest) as info:
        await Engine("tiny", device="cpu", **kwargs).start()
    assert info.value.field == field and "layers" in str(info.value)
    assert workers() == set()


@pytest.mark.parametrize("pp,want", [(1, 8192), (2, 4096), (4, 4096)])
def test_a_step_takes_fewer_tokens_by_default_with_pipeline_stages(pp, want):
    assert Engine("tiny", pp=pp).max_batch_tokens == want
    assert Engine("tiny", pp=pp, max_batch_tokens=1000).max_batch_tokens == 1000


# ---------------------------------------------------------------------------- failures


async def test_without_restarts_a_sigkilled_worker_fails_the_engine_for_good(llama):
    before = workers()
    engine = await Engine(str(llama[0]), pp=2, device="cpu", max_restarts=0).start()
    try:
        stage0 = next(p for p in workers() - before if p.name == "energon-worker-0")
        stream = engine.stream(PROMPT, SamplingParams(max_tokens=1000, **GREEDY))
        others = [
            asyncio.ensure_future(engine.infer([i + 2] * 5, SamplingParams(max_tokens=1000)))
            for i in range(3)
        ]
        await stream.__anext__()  # generating
        os.kill(stage0.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerFailed) as info:
            async for _ in stream:
                pass
        failed = await asyncio.gather(*others, return_exceptions=True)
        assert time.monotonic() - t0 < 5.0  # the process sentinel, not a heartbeat timeout
        assert info.value.rank == 0
        assert all(isinstance(e, WorkerFailed) for e in failed)
        assert engine.health == "failed" and engine.stats()["restarts"] == 0
        with pytest.raises(WorkerFailed):  # and later requests fail at once
            await engine.infer(PROMPT)
    finally:
        t0 = time.monotonic()
        await engine.shutdown()
        assert time.monotonic() - t0 < 10.0  # stage 1, stuck waiting for stage 0, is killed
    assert workers() == before


async def test_shutdown_ends_running_requests_with_finish_reason_abort(llama):
    engine = await Engine(str(llama[0]), device="cpu").start()
    stream = engine.stream(PROMPT, SamplingParams(max_tokens=1000, **GREEDY))
    task = asyncio.ensure_future(engine.infer([7] * 9, SamplingParams(max_tokens=1000, **GREEDY)))
    await stream.__anext__()
    await engine.shutdown()
    pieces = [piece async for piece in stream]
    assert pieces[-1].finish_reason == "abort"
    assert (await task).finish_reason == "abort"
    assert workers() == set()


# ---------------------------------------------------------------------------- embedding


def test_engine_serves_from_inside_a_running_aiohttp_app_under_uvloop(llama):
    web = pytest.importorskip("aiohttp.web")
    aiohttp = pytest.importorskip("aiohttp")
    uvloop = pytest.importorskip("uvloop")
    folder, hf = llama
    ref = hf_greedy(hf, PROMPT, 8)
    engine_key = web.AppKey("engine", Engine)

    async def engine_ctx(app):
        async with Engine(str(folder), device="cpu") as engine:
            app[engine_key] = engine
            yield

    async def generate(request):
        body = await request.json()
        done = await request.app[engine_key].infer(
            body["prompt"], SamplingParams(max_tokens=body["max_tokens"], **GREEDY)
        )
        loop = type(asyncio.get_running_loop()).__module__
        return web.json_response({"token_ids": done.token_ids, "loop": loop})

    async def main():
        app = web.Application()
        app.cleanup_ctx.append(engine_ctx)
        app.router.add_post("/generate", generate)
        runner = web.AppRunner(app)
        await runner.setup()  # the Engine starts inside the server's running loop
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as client:
                url = f"http://127.0.0.1:{port}/generate"

                async def post():
                    async with client.post(url, json={"prompt": PROMPT, "max_tokens": 8}) as r:
                        return await r.json()

                return await asyncio.gather(post(), post(), post())  # batched together
        finally:
            await runner.cleanup()  # shuts the Engine down

    replies = uvloop.run(main())
    for reply in replies:
        assert reply["loop"].startswith("uvloop")
        assert_greedy_equal(reply["token_ids"], ref)
    assert workers() == set()
