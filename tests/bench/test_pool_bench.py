"""`energon bench pool` on CPU with the tiny preset (host mode only): what it writes, not how
fast it runs."""

from __future__ import annotations

import os

import pytest
from bench_helpers import FIELDS, run_scenario

from energon.bench import pool
from energon.bench.cli import SCENARIOS
from energon.pool.messages import SHM_PREFIX

pytestmark = pytest.mark.timeout(180)


def segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)}


def test_pool_is_a_bench_scenario():
    assert SCENARIOS["pool"] == "energon.bench.pool"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("results")
    before = segments()
    # tiny's embedding and head are a third of it: at 0.8 of its weights three of four layers
    # are pooled (two of them in staging buffers at a time)
    records = run_scenario(
        pool,
        "--model tiny --device cpu --modes resident,peer,host,accelerate --budget-fraction 0.8 "
        "--prefill-seqs 3 --prefill-len 16 --decode-seqs 3 --context 20 --block-size 4 "
        "--warmup 1 --repeat 2 --decode-repeat 2 --hf-repeat 1",
        out,
    )
    assert segments() - before == set(), "the bench left shared-memory segments behind"
    return records


def by_metric(records, metric: str, baseline: str | None = None) -> dict:
    (r,) = [
        r
        for r in records
        if r["metric"] == metric and (baseline is None or r["baseline_name"] == baseline)
    ]
    return r


def test_every_record_has_the_benchmarks_md_fields(records):
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert (r["scenario"], r["model"], r["tp"], r["pp"]) == ("pool", "tiny", 1, 1)
        assert r["dtype"] == "float32"
    metrics = {r["metric"] for r in records}
    assert {
        "host_link_bandwidth_to_device",
        "hbm_copy_bandwidth",
        "matmul_rate",
        "prefill_throughput_resident",
        "decode_step_time_resident",
        "prefill_throughput_pooled_host",
        "decode_step_time_pooled_host",
        "pooled_copy_bandwidth_unhidden_pooled_host",
    } <= metrics
    assert not any("pooled_peer" in m for m in metrics)  # no GPUs: the peer rows are skipped


def test_pooled_points_sit_next_to_resident_and_their_floor(records):
    prefill = by_metric(records, "prefill_throughput_pooled_host", "resident")
    resident = by_metric(records, "prefill_throughput_resident")
    assert prefill["baseline_value"] == pytest.approx(resident["value"])
    assert prefill["ratio"] == pytest.approx(prefill["value"] / prefill["baseline_value"])
    assert prefill["of_limit"] == pytest.approx(prefill["value"] / prefill["limit_value"])
    assert (prefill["batch"], prefill["prompt_len"]) == (3, 16)

    decode = by_metric(records, "decode_step_time_pooled_host", "resident")
    step = by_metric(records, "decode_step_time_resident")["value"]
    assert decode["baseline_value"] == pytest.approx(step)
    assert decode["ratio"] == pytest.approx(step / decode["value"])
    assert decode["limit_value"] >= step  # floor = max(resident step, pooled bytes / link)
    assert decode["of_limit"] == pytest.approx(decode["limit_value"] / decode["value"])
    assert (decode["batch"], decode["prompt_len"], decode["gen_len"]) == (3, 20, 1)
    assert "3 of 4 layers pooled" in decode["notes"]

    copies = by_metric(records, "pooled_copy_bandwidth_unhidden_pooled_host")
    link = by_metric(records, "host_link_bandwidth_to_device")
    assert copies["limit_value"] == pytest.approx(link["value"])
    assert copies["of_limit"] == pytest.approx(copies["value"] / link["value"])


def test_accelerate_is_the_baseline_or_says_why_not(records):
    rows = [r for r in records if r["baseline_name"] == "accelerate-offload"]
    assert {r["metric"] for r in rows} == {
        "prefill_throughput_resident",
        "decode_step_time_resident",
        "prefill_throughput_pooled_host",
        "decode_step_time_pooled_host",
    }
    for r in rows:
        if r["baseline_value"] is None:  # transformers / accelerate not installed here
            assert "accelerate row skipped" in r["notes"]
            assert r["ratio"] is None
        else:
            assert r["ratio"] > 0


def test_drop_frees_a_pooled_runner(monkeypatch):
    """The worker rebuilds its runner per mode: a pooled one must not outlive drop() (the pool's
    lease book, registered with atexit, holds the runner's revoke listener)."""
    import gc
    import weakref

    import torch

    import energon.actors

    class Context:
        rank = 0

    monkeypatch.setattr(energon.actors, "actor_context", lambda: Context)
    worker = pool.PoolBenchWorker("cpu")
    worker.build("tiny", "auto", 0, {"mode": "host", "budget": 480_000})
    runner = worker.runner
    assert runner.offload is not None
    runner.offload.attach([torch.zeros(n, dtype=torch.uint8) for n in runner.pool_needs()])
    runner.pool_on_revoke(runner._on_lease_revoked)  # what pool_attach registers
    ref = weakref.ref(runner)
    del runner
    worker.drop()
    gc.collect()
    assert ref() is None
