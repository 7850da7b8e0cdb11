"""`energon bench pipeline` on CPU with the tiny preset, and the stage-overlap measure it reports."""

from __future__ import annotations

import json
import statistics

import pytest
from bench_helpers import parse, run_scenario

from energon.bench import pipeline
from energon.bench.cli import SCENARIOS
from energon.bench.trace import decode_steps, overlap_fraction, steady_window, turnaround


def test_overlap_counts_the_time_two_stages_work_at_once():
    # stage 0 works 0-2 and 4-6; stage 1 waits for its input, then works 1-3 and 5-7
    stage0 = [(0.0, 0.0, 2.0), (4.0, 4.0, 6.0)]
    stage1 = [(0.0, 1.0, 3.0), (3.5, 5.0, 7.0)]
    assert overlap_fraction([stage0, stage1]) == pytest.approx(2.0 / 7.0)
    # one after the other (a blocking pipeline): no overlap, waiting does not count as work
    stage1 = [(0.0, 2.0, 3.0), (3.0, 6.0, 7.0)]
    assert overlap_fraction([stage0, stage1]) == 0.0
    assert overlap_fraction([stage0]) == 0.0
    assert overlap_fraction([[], []]) == 0.0


def test_the_timeline_window_is_taken_from_the_middle_of_the_last_stage():
    last = [(float(i), float(i), i + 0.5) for i in range(100)]
    assert steady_window([[], last], steps=10) == (45.0, 54.5)


def test_turnaround_splits_a_micro_batchs_wait_between_its_steps():
    """Hand-made timeline (ms): two stages, two steps. Step 0 is sent at 0, the first stage
    starts it at 1 and hands it on at 3; the last stage outputs at 6; its reply reaches the
    controller at 8, which sends step 1 at 9 and is done with the reply at 10. The first stage,
    idle since 3, starts step 1 at 9.5; its last stage outputs at 15, reply in at 16, done 17."""
    ms = 1e-3
    first = [(1 * ms, 1 * ms, 3 * ms), (9.5 * ms, 9.5 * ms, 12 * ms)]
    last = [(1 * ms, 3 * ms, 6 * ms), (9.5 * ms, 12 * ms, 15 * ms)]
    controller = [[0.0, 8 * ms, 10 * ms], [9 * ms, 16 * ms, 17 * ms]]
    t = turnaround([first, last], controller)
    assert t["reply_s"] == pytest.approx(1.5 * ms)  # 8 - 6 and 16 - 15
    assert t["control_s"] == pytest.approx(1 * ms)  # reply 0 in at 8, step 1 sent at 9
    assert t["apply_s"] == pytest.approx(1.5 * ms)  # 2 and 1
    assert t["deliver_s"] == pytest.approx(0.5 * ms)  # step 1 only: sent after the stage idled
    assert t["busy"] == pytest.approx(3 / 17)
    assert turnaround([first, last[:1]], controller) is None  # steps that do not pair up


def test_decode_steps_are_taken_apart_stage_by_stage():
    """Hand-made timeline (ms), three stages, three steps; step 1 is a prefill. Decode step 0:
    stage 0 works 0-3, stage 1 has its input at 3.5 and works to 6, stage 2 has it at 8 (busy
    before) and works to 12. Decode step 2: stage 0 works 20-23, stage 1 has its input at 24
    and works to 27, stage 2 has it at 29 and ends at 32."""
    ms = 1e-3
    stage0 = [(0.0, 0.0, 3 * ms), (3 * ms, 3 * ms, 13 * ms), (20 * ms, 20 * ms, 23 * ms)]
    stage1 = [(2 * ms, 3.5 * ms, 6 * ms), (6 * ms, 13 * ms, 19 * ms), (19 * ms, 24 * ms, 27 * ms)]
    stage2 = [(7 * ms, 8 * ms, 12 * ms), (12 * ms, 19 * ms, 28 * ms), (28 * ms, 29 * ms, 32 * ms)]
    d = decode_steps([stage0, stage1, stage2], [True, False, True])
    assert d["steps"] == 2
    assert d["work_s"] == pytest.approx([3 * ms, 2.75 * ms, 3.5 * ms])  # medians of two
    assert d["hop_s"] == pytest.approx([0.75 * ms, 2 * ms])  # (0.5, 1) and (2, 2)
    assert decode_steps([stage0, stage1], [False, False, False]) is None
    assert decode_steps([stage0, stage1[:2]], [True, False, True]) is None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    raw, png = out.parent / "pipeline-raw.json", out.parent / "trace.png"
    profiles = out.parent / "profiles"
    records = run_scenario(
        pipeline,
        f"--model tiny --device cpu --layouts 1x1,1x2 --requests 4 --prompt-len 8 --gen-len 4 "
        f"--raw {raw} --trace {png} --more-in-flight 1 --lookahead on,off "
        f"--profile-dir {profiles}",
        out,
    )
    return records, json.loads(raw.read_text()), png, profiles


def layouts_of(argv: str):
    return pipeline.parse_layouts(parse(pipeline, argv))


def test_layouts_come_from_tp_and_pp_or_from_layouts():
    assert layouts_of("--tp 2 --pp 1,4") == [(2, 1), (2, 4)]
    assert layouts_of("--layouts 8x1,4x2,2X4,1x8") == [(8, 1), (4, 2), (2, 4), (1, 8)]
    with pytest.raises(SystemExit, match="is not TPxPP"):
        layouts_of("--layouts 8x0")


def test_pipeline_is_a_bench_scenario():
    assert SCENARIOS["pipeline"] == "energon.bench.pipeline"


def test_each_pp_is_measured_against_pp1_and_blocking(run):
    records, raw, _, _ = run
    by = {(r["metric"], r["pp"]): r for r in records}
    assert set(by) == {
        ("throughput", 1),
        ("throughput", 2),
        ("nonblocking_vs_blocking", 2),
        ("throughput_3_in_flight", 2),  # --more-in-flight 1: one more than stages
        ("throughput_lookahead_off", 2),
    }
    assert by["throughput", 2]["baseline_name"] == "Energon tp=1 pp=1, same run"
    pp2 = next(r for r in raw["runs"] if r["pp"] == 2)
    assert pp2["turnaround"]["steps"] == len(pp2["stage_traces"][0]) > 0
    assert all(isinstance(r["preemptions"], int) and r["preemptions"] >= 0 for r in pp2["runs"])
    assert "-> reply in the controller" in by["throughput", 2]["notes"]
    d = pp2["decode_steps"]  # the tiny run's 4 new tokens a request: some steps only decode
    assert 0 < d["steps"] < len(pp2["stage_traces"][0]) and len(d["hop_s"]) == 1
    assert all(w > 0 for w in d["work_s"]) and len(d["work_s"]) == 2
    assert "steps that only decode" in by["throughput", 2]["notes"]
    assert "steps that only decode" not in by["throughput", 1]["notes"]
    rates = {run["pp"]: run["rate"] for run in raw["runs"]}
    assert by["throughput", 2]["ratio"] == pytest.approx(rates[2] / rates[1])
    # the Engine's default: with lookahead as many micro-batches as stages
    assert [(r["in_flight"], r["lookahead"]) for r in raw["runs"]] == [(1, True), (2, True)]
    (more,) = raw["more_in_flight"]
    assert more["in_flight"] == 3 and more["runs"][0]["tokens"] == 4 * 4
    assert by["throughput_3_in_flight", 2]["ratio"] == pytest.approx(more["rate"] / rates[1])
    off = raw["lookahead_off"]  # without: one micro-batch more than stages
    assert (off["in_flight"], off["lookahead"], off["runs"][0]["tokens"]) == (3, False, 16)
    assert by["throughput_lookahead_off", 2]["ratio"] == pytest.approx(off["rate"] / rates[1])
    assert "lookahead on" in by["throughput", 2]["notes"]
    nb = by["nonblocking_vs_blocking", 2]
    assert nb["value"] == pytest.approx(rates[2])
    assert nb["baseline_value"] == pytest.approx(raw["blocking"]["rate"])
    for r in records:
        assert r["scenario"] == "pipeline" and r["batch"] == 4 and r["n_gpus"] == 0
        assert 0 < r["of_limit"] and r["limit_value"] > 0 and r["notes"]
    for run_ in raw["runs"]:
        # three timed runs after an untimed one, each request run to its length
        assert [r["tokens"] for r in run_["runs"]] == [4 * 4] * 3
        assert run_["rate"] == statistics.median(r["tokens"] / r["wall_s"] for r in run_["runs"])
        assert all(len(r["memory"]) == run_["pp"] for r in run_["runs"])  # each worker's counts
    assert "median of 3" in by["throughput", 2]["notes"]
    assert "after a full warm-up" in by["throughput", 2]["notes"]
    assert "kv_reserve 0, preemptions per run " in by["throughput", 2]["notes"]


def test_the_trace_has_every_stage_and_steps_of_one_in_flight_never_overlap(run):
    _, raw, png, _ = run
    pp2 = next(r for r in raw["runs"] if r["pp"] == 2)
    assert len(pp2["stage_traces"]) == 2 and raw["blocking"]["in_flight"] == 1
    assert raw["blocking"]["lookahead"] is False  # one step in flight, none chained to it
    first, second = raw["blocking"]["stage_traces"]
    # the later stage waits for each input; one step in flight: the stages take turns
    assert all(t_in >= t0 for t0, t_in, _ in second)
    assert raw["blocking"]["overlap"] < 0.02
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_micro_batchs_decode_step_is_profiled_on_every_stage(run):
    _, raw, _, folder = run
    pp1, pp2 = raw["runs"]
    assert pp1["profiles"] is None  # one stage: nothing to take apart
    assert [p["batch"] for p in pp2["profiles"]] == [2, 2]  # 4 requests over 2 micro-batches
    assert all(p["top"] and p["wall_s"] > 0 for p in pp2["profiles"])
    traces = sorted(f.name for f in folder.iterdir())
    assert traces == ["tp1-pp2-decode2-rank0.json", "tp1-pp2-decode2-rank1.json"]
    assert json.loads((folder / traces[1]).read_text())["traceEvents"]
