"""`energon bench prefix` on cpu: what it writes and that the cached run found the prefix, not
how fast it runs."""

from __future__ import annotations

import pytest
from bench_helpers import FIELDS, run_scenario

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


def test_the_generate_and_pipeline_benches_compute_their_repeated_prompts():
    """They run the same prompts run after run: a cached prefix would skip the prefill HF's
    baseline pays, so their Engine has prefix caching off unless told."""
    from energon.bench.generate import TimedEngine

    assert TimedEngine("tiny", device="cpu").prefix_caching is False
    assert TimedEngine("tiny", device="cpu", prefix_caching=True).prefix_caching is True
