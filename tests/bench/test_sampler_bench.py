"""`energon bench sampler` on cpu: what it writes, not how fast it runs; and that its baseline,
transformers' logits processors, picks the tokens Energon's Sampler picks where both are greedy."""

from __future__ import annotations

import os

import pytest
import torch
from bench_helpers import FIELDS, parse, run_scenario

from energon.bench import sampler
from energon.bench.cli import SCENARIOS
from energon.sampler import Sampler
from energon.sampling import SamplingParams


def test_each_case_and_row_count_is_a_record_with_its_baseline_and_floor(tmp_path):
    args = "--device cpu --rows 1,3 --calls 2 --repeat 1 --vocab 500"
    records = run_scenario(sampler, args, tmp_path)
    points = [r for r in records if r["metric"] != "copy_bandwidth"]
    assert SCENARIOS["sampler"] == "energon.bench.sampler"
    assert sorted((r["batch"], r["metric"]) for r in points) == sorted(
        (rows, f"{case}_us{suffix}")
        for rows in (1, 3)
        for case in sampler.CASES
        for suffix in ("", sampler.EAGER_SUFFIX)  # --kernels on,off: each case both ways
    )
    for r in points:
        assert FIELDS <= set(r) and r["unit"] == "us"
        assert r["ratio"] == pytest.approx(r["baseline_value"] / r["value"])
        assert r["of_limit"] == pytest.approx(r["limit_value"] / r["value"]) and r["of_limit"] < 1
    assert [r["metric"] for r in records].count("copy_bandwidth") == 1
    # the two settings of a case share one measurement of the baseline
    by_metric = {(r["batch"], r["metric"]): r for r in points}
    for (rows, metric), r in by_metric.items():
        if metric.endswith(sampler.EAGER_SUFFIX):
            on = by_metric[(rows, metric.removesuffix(sampler.EAGER_SUFFIX))]
            assert on["baseline_value"] == r["baseline_value"] and "eager" in r["notes"]


def test_kernels_off_turns_the_switch_off_and_restores_it(monkeypatch):
    [switch] = sampler.SWITCHES
    monkeypatch.setenv(switch, "1")
    with sampler.kernels(False):
        assert os.environ[switch] == "0"
    assert os.environ[switch] == "1"
    monkeypatch.delenv(switch)
    with sampler.kernels(False):
        assert os.environ[switch] == "0"
    assert switch not in os.environ
    with sampler.kernels(True):
        assert switch not in os.environ


def test_the_baseline_is_the_same_greedy_choice():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=g) * 3
    logits[:, 10] = logits.max() + 1  # the bias of -5 on id 10 moves the argmax
    logits = logits.half()
    input_ids = torch.randint(0, 300, (4, 20), generator=g)
    for name in ("greedy", "greedy_repetition", "greedy_logit_bias"):
        params = SamplingParams(**sampler.CASES[name])
        theirs = sampler.hf_step(params, input_ids, torch.Generator())(logits)
        rows = [params.to_wire() for _ in range(4)]
        if params.penalised or params.logit_bias:  # as step.py sends a first row
            prompt = input_ids.tolist()
            rows = [{**r, "seq": i, "history": [], "prompt": prompt[i]} for i, r in enumerate(rows)]
        ours, _ = Sampler(seed=0).sample(logits, rows, [0] * 4)
        assert ours.tolist() == theirs.tolist(), name
    assert 10 not in theirs.tolist()
    assert parse(sampler, "").rows == "1,64,256"
