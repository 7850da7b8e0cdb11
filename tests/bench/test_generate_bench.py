"""`energon bench generate` on CPU with the tiny preset: what it writes, not how fast it runs."""

from __future__ import annotations

import json

import pytest
from bench_helpers import FIELDS, run_scenario

from energon.bench import generate
from energon.bench.cli import SCENARIOS

POINTS = {"decode_latency_b1", "throughput", "first_token_latency_b1"}


def test_generate_is_a_bench_scenario():
    assert SCENARIOS["generate"] == "energon.bench.generate"


def test_prompts_are_seeded_token_ids_of_the_asked_length():
    a = generate.make_prompts(260, 3, 10, seed=1)
    assert a == generate.make_prompts(260, 3, 10, seed=1)
    assert a != generate.make_prompts(260, 3, 10, seed=2)
    assert [len(p) for p in a] == [10, 10, 10]
    assert all(4 <= t < 260 for p in a for t in p)


def test_worker_log_summary_splits_decode_steps_into_busy_and_idle():
    log = [(0.0, 1.0, 2, 20, 20), (1.5, 2.0, 2, 2, 22), (2.5, 3.0, 2, 2, 24), (3.5, 4.0, 2, 2, 26)]
    s = generate.summarize_log(log, 2)
    assert s["steps"] == 4 and s["decode_steps"] == 3
    assert s["busy_s"] == pytest.approx(0.5)
    assert s["gap_s"] == pytest.approx(0.5)
    assert s["period_s"] == pytest.approx(1.0)
    assert s["prefill_busy_s"] == pytest.approx(1.0)
    assert s["executed"] == [[20, 20], [2, 22], [2, 24], [2, 26]]


def test_worker_log_summary_of_steps_queued_behind_the_last():
    # lookahead: each step was launched 0.2 s before the last one's device work ended
    log = [(0.0, 1.0, 1, 1, 5), (0.8, 2.0, 1, 1, 6), (1.8, 3.5, 1, 1, 7)]
    s = generate.summarize_log(log, 1)
    assert s["busy_s"] == pytest.approx(1.0)  # from the previous end: 1.0, 1.0, 1.5
    assert s["gap_s"] == 0.0
    assert s["period_s"] == pytest.approx(1.25)  # end to end: 1.0, 1.5


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("results")
    raw = out.parent / "generate-raw.json"
    records = run_scenario(
        generate,
        f"--model tiny --device cpu --tp 1 --prompt-len 8 --gen-len 4 --batch 3 --repeat 1 "
        f"--batch-repeat 1 --hf-repeat 3 --profile --graphs auto,static --lookahead on,off "
        f"--raw {raw}",
        out,
    )
    return records, json.loads(raw.read_text())


def test_every_record_has_the_benchmark_fields(run):
    records, _ = run
    ablation = {p + s for p in POINTS for s in ("_graphs_static", "_lookahead_off")}
    assert {r["metric"] for r in records} == POINTS | ablation | {"matmul_rate", "copy_bandwidth"}
    for r in records:
        assert FIELDS <= r.keys()
        assert r["scenario"] == "generate" and r["model"] == "tiny"
        assert r["tp"] == 1 and r["pp"] == 1 and r["n_gpus"] == 0
        assert r["prompt_len"] == 8 and r["gen_len"] == 4
        assert r["value"] > 0 and r["card"] and r["torch"]


def test_measured_points_carry_baseline_ratio_and_limit(run):
    records, _ = run
    by_metric = {r["metric"]: r for r in records}
    assert by_metric["decode_latency_b1"]["batch"] == 1
    assert by_metric["throughput"]["batch"] == 3
    assert "first token of the 3 requests submitted at once" in by_metric["throughput"]["notes"]
    for metric in POINTS:
        r = by_metric[metric]
        assert r["baseline_name"].startswith("HF transformers")
        assert r["baseline_value"] > 0 and r["ratio"] > 0
        assert r["limit_value"] > 0 and 0 < r["of_limit"]
        assert r["notes"]
    # the first token's device share: the prompt's step on the worker, from the raw marks
    prefill = run[1]["runs"][0]["single"][0]["worker"]["prefill_busy_s"]
    assert 0 < prefill < by_metric["first_token_latency_b1"]["value"] / 1e3
    assert (
        f"device (worker marks, median): {prefill * 1e3:.2f} ms"
        in (by_metric["first_token_latency_b1"]["notes"])
    )
    # ... and where the rest went: the prompt's own step paired on both sides, so every part
    # is a forward interval of the same clock, and they add up to the first token
    split = run[1]["runs"][0]["single"][0]["first_token_split"]
    assert list(split) == ["schedule_s", "deliver_s", "step_s", "reply_s", "apply_s"]
    assert all(0 <= v < 1 for v in split.values()), split
    first = run[1]["runs"][0]["single"][0]["first_token_s"]
    assert sum(split.values()) == pytest.approx(first)
    assert split["step_s"] == pytest.approx(prefill, rel=0.5)
    assert "split (medians, ms): schedule" in by_metric["first_token_latency_b1"]["notes"]
    # ratio > 1 means Energon wins: baseline time / Energon time, or Energon rate / baseline rate
    d, t = by_metric["decode_latency_b1"], by_metric["throughput"]
    assert d["ratio"] == pytest.approx(d["baseline_value"] / d["value"])
    assert t["ratio"] == pytest.approx(t["value"] / t["baseline_value"])
    assert d["of_limit"] == pytest.approx(d["limit_value"] / d["value"])
    assert t["of_limit"] == pytest.approx(t["value"] / t["limit_value"])


def test_raw_figures_hold_worker_timing_and_profiles(run):
    _, raw = run
    engine, static, sequential = raw["runs"]
    assert engine["facts"][0]["rank"] == 0
    single = engine["single"][0]
    assert single["tokens"] == 4
    assert single["worker"]["decode_steps"] == 3 and single["worker"]["busy_s"] > 0
    assert engine["batched"][0]["tokens"] == 12
    assert set(engine["profiles"]) == {"1", "3", "prefill"}
    assert engine["profiles"]["prefill"]["batch"] == 1 and engine["profiles"]["prefill"]["top"]
    assert raw["hf"]["1"]["full_s"] and raw["hf"]["3"]["full_s"]
    # on cpu "auto" runs eagerly; the "static" run took the decode-graph buffers for decode steps
    assert engine["facts_after"]["decode_graphs"] == "off"
    assert engine["facts_after"]["graph_steps"] == 0
    assert static["graphs"] == "static" and static["facts_after"]["decode_graphs"] == "static"
    decode_steps = 3 * (1 + 1 + 1) + 3 * 1  # warm-up, timed single, profile at 1; batches of 3
    assert static["facts_after"]["graph_steps"] >= decode_steps
    # lookahead (the default) chained decode steps; the ablation without it did not
    assert engine["lookahead"] and engine["facts_after"]["chained_steps"] > 0
    assert not sequential["lookahead"] and sequential["facts_after"]["chained_steps"] == 0


def test_a_profile_takes_the_armed_decode_step_or_one_near_it():
    match = generate.profile_matches
    assert not match(None, False, 64, 64)  # not armed
    assert match(64, False, 64, 64) and match(64, False, 48, 48) and match(64, False, 70, 70)
    assert not match(64, False, 47, 47)  # under 3/4 of a micro-batch
    assert not match(64, False, 64, 600)  # prompt tokens in the step: not a decode step
    assert match(1, False, 1, 1) and not match(1, False, 1, 9)
    assert match(1, True, 1, 9) and not match(1, True, 2, 18) and not match(1, True, 1, 1)
