"""`energon bench forward` on CPU with the tiny preset: what it writes, not how fast it runs."""

from __future__ import annotations

import pytest
import torch
from bench_helpers import FIELDS, run_scenario

from energon.bench import forward
from energon.bench.cli import SCENARIOS
from energon.bench.timed_runner import TimedRunner


def test_forward_is_a_bench_scenario():
    assert SCENARIOS["forward"] == "energon.bench.forward"


def test_batch_is_seeded_and_within_the_length_range():
    a = forward.make_batch(260, 16, 8, 32, seed=3)
    assert a == forward.make_batch(260, 16, 8, 32, seed=3)
    assert a != forward.make_batch(260, 16, 8, 32, seed=4)
    assert all(8 <= len(s) <= 32 for s in a)
    assert all(4 <= t < 260 for s in a for t in s)


def test_both_timed_paths_give_the_last_token_logits_of_a_plain_forward():
    seqs = forward.make_batch(260, 3, 4, 12, seed=1)
    timed = TimedRunner(model="tiny", rank=0)
    full = timed.runner.forward(seqs)  # every token's logits, padding-free
    last = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
    for kind in ("packed", "padded"):
        torch.testing.assert_close(timed._step(kind, seqs).float(), full[last])


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("results")
    return run_scenario(
        forward,
        "--model tiny --device cpu --tp 1 --seqs 4 --min-len 8 --max-len 32 --warmup 1 --repeat 2",
        out,
    )


def test_every_record_has_the_benchmarks_md_fields(records):
    metrics = {r["metric"] for r in records}
    assert {"forward_time", "matmul_rate", "copy_bandwidth"} <= metrics
    assert metrics <= {
        "forward_time",
        "matmul_rate",
        "copy_bandwidth",
        "forward_time_grid_attention",
    }
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert (r["scenario"], r["model"], r["tp"], r["pp"], r["batch"]) == (
            "forward",
            "tiny",
            1,
            1,
            4,
        )


def test_forward_record_sets_padding_free_against_padded_and_the_floor(records):
    (point,) = [r for r in records if r["metric"] == "forward_time"]
    (rate,) = [r for r in records if r["metric"] == "matmul_rate"]
    assert point["baseline_name"] == "padded"
    assert point["ratio"] == pytest.approx(point["baseline_value"] / point["value"])
    assert point["of_limit"] == pytest.approx(point["limit_value"] / point["value"])
    # tiny: 4 layers of q 64x64, k/v 32x64, o 64x64, gate/up 128x64, down 64x128 per GPU
    params = 4 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64)
    tokens = sum(len(s) for s in forward.make_batch(260, 4, 8, 32, seed=0))
    floor = 2 * params * tokens / (rate["value"] * 1e12)
    assert point["limit_value"] == pytest.approx(floor, rel=1e-9)
    assert "same argmax True" in point["notes"]
