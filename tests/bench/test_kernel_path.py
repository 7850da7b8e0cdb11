"""Charging overlapped kernels (energon/bench/kernel_path.py) against hand-computed steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from energon.bench.kernel_path import by_name, charges, report, trace_kernels

ROOT = Path(__file__).resolve().parents[2]


def test_a_kernel_that_started_early_is_charged_from_the_end_before_it():
    # gemv 0-10; attention resident from 4, ends 14; gemv2 resident from 11, ends 20;
    # a gap of 5 before norm (25-27)
    step = charges([("attn", 4, 10), ("gemv", 0, 10), ("gemv2", 11, 9), ("norm", 25, 2)])
    assert [c.name for c in step] == ["gemv", "attn", "gemv2", "norm"]
    assert [c.charged for c in step] == [10, 4, 6, 2]
    assert [c.gap for c in step] == [0, 0, 0, 5]
    assert sum(c.charged + c.gap for c in step) == 27  # the span
    assert sum(c.duration for c in step) == 31  # what summing the profile would say


def test_a_kernel_inside_another_costs_nothing():
    step = charges([("long", 0, 10), ("inside", 2, 3), ("after", 9, 4)])
    assert [(c.name, c.charged) for c in step] == [("long", 10), ("inside", 0), ("after", 3)]


def test_totals_per_name_largest_charge_first():
    totals = by_name(charges([("a", 0, 2), ("b", 2, 6), ("a", 7, 2), ("a", 8, 2)]))
    assert list(totals) == ["b", "a"]
    assert (totals["a"].calls, totals["a"].charged, totals["a"].duration) == (3, 4, 6)
    assert totals["b"].charged == 6


@pytest.fixture
def trace(tmp_path):
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},  # host: ignored
        {"ph": "X", "cat": "kernel", "name": "_gemv_kernel", "ts": 10, "dur": 20},
        {"ph": "X", "cat": "kernel", "name": "_norm_kernel", "ts": 15, "dur": 20},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 40, "dur": 1},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 50},  # not a span: ignored
    ]
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps({"traceEvents": events}))
    return path


def test_a_chrome_traces_device_spans_are_read(trace):
    assert trace_kernels(trace) == [
        ("_gemv_kernel", 10.0, 20.0),
        ("_norm_kernel", 15.0, 20.0),
        ("Memcpy HtoD", 40.0, 1.0),
    ]
    text = report(trace)
    assert "3 device events over 31.0 us: charged 26.0, idle 5.0, profiled durations 41.0" in text
    assert "     1        20.0    20.00         20.0  _gemv_kernel" in text


def test_the_script_prints_the_report(trace):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernel_path.py"), str(trace)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == report(trace)
