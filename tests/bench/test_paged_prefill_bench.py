"""`energon bench paged-prefill` on cpu, the kernel in Triton's interpreter: what it writes (a
record per shape with its baseline and limit), not how fast it runs."""

from __future__ import annotations

import pytest
from bench_helpers import FIELDS, run_interpreted

from energon.bench.cli import SCENARIOS
from energon.bench.paged_prefill import parse_shape, work


def test_each_shape_is_a_record_with_its_baseline_and_limit(tmp_path):
    pytest.importorskip("triton")
    assert SCENARIOS["paged-prefill"] == "energon.bench.paged_prefill"
    argv = (
        "--shapes 2x8@24,1x5@5 --heads 2 --kv-heads 1 --head-dim 16 --warmup 0 --repeat 1 "
        "--configs 16:16:1:1"
    )
    records = run_interpreted("paged-prefill", argv, tmp_path)
    points = [r for r in records if r["metric"].startswith("prefill_attention_layer_")]
    assert [r["metric"] for r in points] == [
        "prefill_attention_layer_2x8@24",
        "prefill_attention_layer_1x5@5",
    ]
    for r in points:
        assert FIELDS <= set(r) and r["unit"] == "us"
        assert r["ratio"] == pytest.approx(r["baseline_value"] / r["value"])
        assert r["of_limit"] == pytest.approx(r["limit_value"] / r["value"])
        assert "max |kernel - grid|" in r["notes"] and "16:16:1:1" in r["notes"]
        diff = float(r["notes"].split("max |kernel - grid| ")[1].split(";")[0])
        assert diff < 5e-3  # fp16: the kernel and the grid path agree
    writes = [r for r in records if r["metric"].startswith("cache_write_layer_")]
    assert [r["metric"] for r in writes] == ["cache_write_layer_2x8@24", "cache_write_layer_1x5@5"]
    for r, tokens in zip(writes, (16, 5), strict=True):
        assert FIELDS <= set(r) and r["baseline_name"].startswith("index_copy_")
        assert r["ratio"] == pytest.approx(r["baseline_value"] / r["value"])
        assert f"the {tokens} new tokens' K and V" in r["notes"]
        assert f"{2 * 2 * tokens * 16 * 2 / 1e6:.1f} MB read and written" in r["notes"]
    assert {r["metric"] for r in records} >= {"copy_bandwidth", "matmul_rate"}


def test_work_counts_each_query_against_the_keys_up_to_it():
    # 1 sequence, 2 new tokens after 3 cached: the queries see 4 and 5 keys, 9 pairs
    flops, nbytes = work(1, 2, 5, heads=1, kv_heads=1, dim=8, elem=2)
    assert flops == 4 * 8 * 9
    assert nbytes == 2 * 5 * 8 * 2 + 2 * 2 * 8 * 2  # K and V of 5 keys, q and out of 2 rows


def test_shapes_are_checked():
    assert parse_shape("64x64@1088") == (64, 64, 1088)
    for bad in ("64x64", "0x4@8", "2x9@8", "ax1@2"):
        with pytest.raises(ValueError, match="shape"):
            parse_shape(bad)
