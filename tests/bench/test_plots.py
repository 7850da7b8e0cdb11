"""bench/plot.py's drawing: one PNG per results file, from the records that carry a ratio or a
limit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from energon.bench.plots import plot_results, point_label, rows_of

ROOT = Path(__file__).resolve().parents[2]


def record(metric, ratio, of_limit, **extra):
    return {"metric": metric, "ratio": ratio, "of_limit": of_limit, "tp": 1, "pp": 1, **extra}


def test_a_png_is_drawn_from_the_points_with_a_ratio_or_a_limit(tmp_path):
    results = tmp_path / "2026-01-01-card-x.json"
    rows = [record("throughput", 1.5, 0.6, batch=64), record("matmul_rate", None, None)]
    results.write_text(json.dumps(rows))
    out = plot_results(results, tmp_path / "img")
    assert out == tmp_path / "img" / "2026-01-01-card-x.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    only_rates = tmp_path / "rates.json"
    only_rates.write_text(json.dumps([record("matmul_rate", None, None)]))
    assert plot_results(only_rates, tmp_path / "img") is None


def test_many_points_are_drawn_in_rows_one_under_another(tmp_path):
    assert [len(r) for r in rows_of(list(range(40)), 16)] == [16, 16, 8]
    assert rows_of([], 16) == [] and rows_of([1], 16) == [[1]]
    results = tmp_path / "many.json"
    results.write_text(json.dumps([record(f"m{i}", 1.0 + i / 40, 0.5) for i in range(40)]))
    from PIL import Image

    wide, tall = Image.open(plot_results(results, tmp_path)).size
    assert tall > 2 * 4.6 * 100 and wide < 1.3 * 17 * 100  # three rows of at most 16 points


def test_a_point_is_labelled_by_metric_layout_and_batch():
    label = point_label(record("decode_latency_b1", 1.0, 0.5, tp=2, pp=4, batch=1))
    assert label.split("\n")[-1] == "tp=2 pp=4 b=1"
    assert "decode latency" in label


def test_the_script_draws_the_files_it_is_given(tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps([record("throughput", 2.0, 0.4)]))
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plot.py"), str(results), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
