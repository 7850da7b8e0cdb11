"""`energon bench paged-attention` on cpu, the kernel in Triton's interpreter: what it writes (a
record per shape with its baseline and limit, and with --shared-prefix one more of the kernel
reading the shared keys once), not how fast it runs."""

from __future__ import annotations

import pytest
from bench_helpers import FIELDS, run_interpreted


def test_shapes_and_shared_prefixes_are_records_with_baseline_and_limit(tmp_path):
    pytest.importorskip("triton")
    argv = (
        "--batches 3 --contexts 80 --shared-prefix 64 --heads 2 --kv-heads 1 --head-dim 16 "
        "--warmup 0 --repeat 1 --prefix-configs 2:16:4"
    )
    records = {r["metric"]: r for r in run_interpreted("paged-attention", argv, tmp_path)}
    each, once = records["decode_attention_layer"], records["decode_attention_layer_shared_prefix"]
    for r in (each, once):
        assert FIELDS <= set(r) and r["unit"] == "us" and r["batch"] == 3
        assert r["ratio"] == pytest.approx(r["baseline_value"] / r["value"])
        assert r["of_limit"] == pytest.approx(r["limit_value"] / r["value"])
    assert once["baseline_value"] == pytest.approx(each["value"])
    # both floors: the distinct K+V bytes (64 shared keys + 3 x 16 own, 64 bytes a key: K and V
    # of 1 KV head x 16 dims in fp16) / the run's copy bandwidth
    bandwidth = records["copy_bandwidth"]["value"] * 1e9
    floor_us = (64 + 3 * 16) * 64 / bandwidth * 1e6
    assert (
        once["limit_value"] == pytest.approx(floor_us)
        and each["limit_value"] == once["limit_value"]
    )
    diff = float(once["notes"].split("grid path| ")[1].split(";")[0])
    assert diff < 5e-3  # fp16: the kernel with groups and the grid path agree
    assert "prefix-pass configs parts:block_n:warps us: 2:16:4 " in once["notes"]
