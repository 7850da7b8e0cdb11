"""`energon bench allreduce`: its options, its skip without GPUs, and on cpu (gloo, 2 ranks)
what it writes, not how fast it runs."""

from __future__ import annotations

import pytest
from bench_helpers import FIELDS, parse, run_scenario

from energon.bench import allreduce
from energon.bench.cli import SCENARIOS


def test_allreduce_is_a_bench_scenario():
    assert SCENARIOS["allreduce"] == "energon.bench.allreduce"


def test_sizes_are_bytes_with_kib_and_mib_suffixes():
    assert allreduce.parse_sizes("1K,10k,4M,100") == [1024, 10240, 4 << 20, 100]
    assert 5120 * 2 in allreduce.parse_sizes(allreduce.DEFAULT_SIZES)  # opt-13b's decode message
    for bad in ("0K", "1G", "K", "-4"):
        with pytest.raises(ValueError, match="is not a positive byte count"):
            allreduce.parse_sizes(bad)


def test_without_two_gpus_it_says_so_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(allreduce, "visible_gpus", lambda: 1)
    assert allreduce.main(parse(allreduce, f"--out {tmp_path}")) == 0
    assert "skipped, it needs 2 GPUs and 1 are visible" in capsys.readouterr().out
    assert allreduce.main(parse(allreduce, f"--gpus 4 --out {tmp_path}")) == 0
    assert "skipped, it needs 4 GPUs" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_bad_options_are_refused_before_anything_starts(tmp_path, capsys):
    assert allreduce.main(parse(allreduce, f"--device cpu --sizes 1X --out {tmp_path}")) == 2
    assert allreduce.main(parse(allreduce, f"--device cpu --dtypes half8 --out {tmp_path}")) == 2
    assert "not a list of torch dtypes" in capsys.readouterr().err


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("results")
    return run_scenario(
        allreduce, "--device cpu --sizes 1K,10K --dtypes float16 --iters 3 --repeat 2", out
    )


def test_every_record_has_the_benchmarks_md_fields(records):
    assert [r["metric"] for r in records] == [
        "all_reduce_eager_1024B",
        "all_reduce_eager_10240B",
        "copy_bandwidth",
    ]
    for r in records:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert (r["scenario"], r["tp"], r["n_gpus"]) == ("allreduce", 2, 0)


def test_a_point_is_energon_against_the_collective_with_its_ratio(records):
    for r in records[:2]:
        assert r["unit"] == "us" and r["dtype"] == "float16"
        assert r["baseline_name"] == "gloo all_reduce (torch.distributed)"
        assert r["value"] > 0 and r["baseline_value"] > 0
        assert r["ratio"] == pytest.approx(r["baseline_value"] / r["value"])
        assert "same result as gloo: True" in r["notes"]
        assert r["limit_value"] is None and r["of_limit"] is None  # no NVLink on cpu
