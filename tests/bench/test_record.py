"""The benches' shared console table (energon.bench.record.print_records)."""

from __future__ import annotations

from energon.bench.record import Record, print_records


def test_the_table_has_a_line_per_record_with_dashes_where_a_field_is_missing(capsys):
    measured = Record(
        "generate", "throughput", "tokens/s", 3812.5, tp=2, baseline_value=2438.0, ratio=1.5637,
        limit_value=4468.0, of_limit=0.8533, card="card", torch="t", git_sha="s",
    )  # fmt: skip
    limit = Record("generate", "copy_bandwidth", "GB/s", 2950.5, dtype=None, card="c")
    print_records([measured, limit], lead="tp")
    print_records([limit], lead="dtype")
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    head, first, second, head2, third = lines
    assert head.split() == "tp metric value unit baseline ratio limit of_limit".split()
    assert first.split() == "2 throughput 3812 tokens/s 2438 1.564 4468 0.853".split()
    assert second.split() == "1 copy_bandwidth 2950 GB/s - - - -".split()
    assert head2.split()[0] == "dtype" and third.split()[0] == "-"


def test_git_sha_names_the_commit_the_environment_gives(monkeypatch):
    from energon.bench.record import git_sha

    monkeypatch.setenv("ENERGON_GIT_SHA", "abc1234")
    assert git_sha() == "abc1234"
    monkeypatch.delenv("ENERGON_GIT_SHA")
    assert git_sha() not in ("", "abc1234")


def test_a_second_run_into_the_same_folder_keeps_the_first_runs_other_points(tmp_path):
    """Two models benched into one folder: one file with both; a point measured again holds the
    newer record only."""
    import json

    from energon.bench.record import write_results

    def run(model, value, tps=(1, 2)):
        return [
            Record("generate", "decode_latency_b1", "ms/token", value + tp, model=model, tp=tp,
                   card="NVIDIA H200", torch="t", git_sha=model[:3])
            for tp in tps
        ]  # fmt: skip

    first = write_results("generate", run("opt-13b", 7.0), tmp_path)
    second = write_results("generate", run("llama-2-13b", 8.0), tmp_path)
    assert first == second and first.name.endswith("-nvidia-h200-generate.json")
    rows = json.loads(first.read_text())
    assert [(r["model"], r["tp"], r["value"]) for r in rows] == [
        ("llama-2-13b", 1, 9.0), ("llama-2-13b", 2, 10.0), ("opt-13b", 1, 8.0), ("opt-13b", 2, 9.0)
    ]  # fmt: skip
    write_results("generate", run("opt-13b", 6.0, tps=(2,)), tmp_path)
    rows = json.loads(first.read_text())
    assert [(r["model"], r["tp"], r["value"]) for r in rows] == [
        ("opt-13b", 2, 8.0), ("llama-2-13b", 1, 9.0), ("llama-2-13b", 2, 10.0), ("opt-13b", 1, 8.0)
    ]  # fmt: skip
