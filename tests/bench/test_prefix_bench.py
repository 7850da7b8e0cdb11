"""`energon bench prefix` on cpu: what it writes and that the cached run found the prefix (in the
cold mode: that the requests waiting for it did), not how fast it runs; the cold mode's limit."""

from __future__ import annotations

import pytest
from bench_helpers import FIELDS, parse, run_scenario

from energon.bench import prefix
from energon.bench.cli import SCENARIOS

pytestmark = pytest.mark.timeout(300)


def test_throughput_and_first_token_against_the_engine_without_prefix_caching(tmp_path):
    args = "--device cpu --model tiny --requests 3 --prefix-len 48 --suffix-len 5 --gen-len 3"
    records = run_scenario(prefix, f"{args} --repeat 1", tmp_path)
    assert SCENARIOS["prefix"] == "energon.bench.prefix"
    by_metric = {r["metric"]: r for r in records}
    assert set(by_metric) == {"throughput", "first_token_ms", "copy_bandwidth"}
    for name in ("throughput", "first_token_ms"):
        r = by_metric[name]
        assert FIELDS <= set(r) and r["baseline_name"].endswith("prefix_caching=False")
        assert r["limit_value"] > 0 and 0 < r["of_limit"]
        assert (r["batch"], r["prompt_len"], r["gen_len"]) == (3, 53, 3)
    throughput = by_metric["throughput"]
    assert throughput["ratio"] == pytest.approx(throughput["value"] / throughput["baseline_value"])
    first = by_metric["first_token_ms"]
    assert first["ratio"] == pytest.approx(first["baseline_value"] / first["value"])
    # the cached run found the 48-token prefix (3 blocks of 16) for each of the 3 requests
    assert "tokens found cached per run [144] (without: [0])" in throughput["notes"]
    # on cpu decode attention takes the grid path: no step reads the prefix once
    assert "decode steps reading the shared prefix once: 0" in throughput["notes"]


def test_read_each_is_one_more_engine_against_the_same_baseline(tmp_path):
    args = "--device cpu --model tiny --requests 2 --prefix-len 32 --suffix-len 3 --gen-len 2"
    records = run_scenario(prefix, f"{args} --repeat 1 --read-each", tmp_path)
    by_metric = {r["metric"]: r for r in records}
    assert set(by_metric) >= {"throughput_read_each", "first_token_ms_read_each"}
    each, on = by_metric["throughput_read_each"], by_metric["throughput"]
    assert FIELDS <= set(each) and each["baseline_value"] == on["baseline_value"]
    assert (
        "ENERGON_SHARED_PREFIX=0" in each["notes"]
        and "tokens found cached per run [64]" in each["notes"]
    )


def test_cold_burst_with_and_without_waiting_for_the_prefix_against_no_prefix_caching(tmp_path):
    args = "--device cpu --model tiny --requests 3 --prefix-len 48 --suffix-len 5 --gen-len 3"
    records = run_scenario(prefix, f"{args} --repeat 1 --cold", tmp_path)
    by_metric = {r["metric"]: r for r in records}
    assert set(by_metric) == {
        "throughput_cold",
        "first_token_ms_cold",
        "throughput_cold_no_prefix_wait",
        "first_token_ms_cold_no_prefix_wait",
        "copy_bandwidth",
    }
    for name in set(by_metric) - {"copy_bandwidth"}:
        r = by_metric[name]
        assert FIELDS <= set(r) and r["baseline_name"].endswith("prefix_caching=False")
        assert r["limit_value"] > 0 and 0 < r["of_limit"]
        assert (r["batch"], r["prompt_len"], r["gen_len"]) == (3, 53, 3)
    unwaited = by_metric["throughput_cold_no_prefix_wait"]
    assert unwaited["ratio"] == pytest.approx(unwaited["value"] / unwaited["baseline_value"])
    assert "ENERGON_PREFIX_WAIT=0" in unwaited["notes"]
    # each run's prefix was new: with waiting, two of the three requests found its 3 blocks of
    # 16 computed by the first; without waiting all three were admitted at once and computed it
    found = "tokens found cached per run [96] (ENERGON_PREFIX_WAIT=0: [0]; without: [0])"
    assert found in by_metric["throughput_cold"]["notes"]


def test_the_cold_limit_computes_the_prefix_once_before_the_suffixes():
    shape = "--requests 64 --prefix-len 1024 --suffix-len 64 --gen-len 32"
    limit = {"matmul_flops": 1e15, "copy_bytes_per_s": 4e12}
    # 26 GB of fp16 weights (13e9 parameters), 800 kB of K/V a token
    warm_first, warm_rate = prefix.floors(parse(prefix, shape), limit, 26e9, 800e3, 2)
    cold_first, cold_rate = prefix.floors(parse(prefix, f"{shape} --cold"), limit, 26e9, 800e3, 2)
    # the prefix's step is compute-bound: 2 x 13e9 x 1,024 FLOPs (26.6 ms) against reading the
    # weights and its K/V (26.8 GB at 4 TB/s: 6.7 ms)
    prefix_step = 2 * 13e9 * 1024 / 1e15
    assert cold_first == pytest.approx(warm_first + prefix_step)
    assert cold_rate == pytest.approx(64 * 32 / (64 * 32 / warm_rate + prefix_step))


def test_the_limit_reads_the_shared_prefix_once_a_step():
    args = parse(prefix, "--requests 64 --prefix-len 1024 --suffix-len 64 --gen-len 2")
    limit = {"matmul_flops": 1e15, "copy_bytes_per_s": 4e12}
    first, rate = prefix.floors(args, limit, 26e9, 800e3, 2)
    # the suffixes' step: 4,096 tokens of products (106.5 ms) against the weights and the
    # prefix's K/V once plus the suffixes' (26e9 + 800e3 x 5,120 bytes: 7.5 ms)
    assert first == pytest.approx(2 * 13e9 * 4096 / 1e15)
    # the decode step reads the weights, the prefix once and 65 tokens of each request
    decode = (26e9 + 800e3 * (1024 + 64 * 65)) / 4e12
    assert rate == pytest.approx(64 * 2 / (first + decode))


def test_the_generate_and_pipeline_benches_compute_their_repeated_prompts():
    """They run the same prompts run after run: a cached prefix would skip the prefill HF's
    baseline pays, so their Engine has prefix caching off unless told."""
    from energon.bench.generate import TimedEngine

    assert TimedEngine("tiny", device="cpu").prefix_caching is False
    assert TimedEngine("tiny", device="cpu", prefix_caching=True).prefix_caching is True
