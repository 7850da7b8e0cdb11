"""`energon bench paged-prefill` on cpu, the kernel in Triton's interpreter: what it writes (a
record per shape with its baseline and limit), not how fast it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from bench_helpers import FIELDS

from energon.bench.cli import SCENARIOS
from energon.bench.paged_prefill import parse_shape, work


def test_each_shape_is_a_record_with_its_baseline_and_limit(tmp_path):
    pytest.importorskip("triton")
    assert SCENARIOS["paged-prefill"] == "energon.bench.paged_prefill"
    # the interpreter must be chosen before triton is imported: a process of its own
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = (
        "import sys; from energon.cli import main; sys.exit(main(['bench', 'paged-prefill', "
        "'--shapes', '2x8@24,1x5@5', '--heads', '2', '--kv-heads', '1', '--head-dim', '16', "
        f"'--warmup', '0', '--repeat', '1', '--configs', '16:16:1:1', '--out', '{tmp_path}']))"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.iterdir()
    records = json.loads(path.read_text())
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
