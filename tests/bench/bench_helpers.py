"""Shared by the bench tests: the fields every BENCHMARKS.md record carries, a scenario's
command line parsed as `energon bench SCENARIO` would parse it, and a scenario run to its
results file, in this process or in one of its own with Triton's interpreter."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

FIELDS = {
    "scenario", "model", "dtype", "tp", "pp", "batch", "prompt_len", "gen_len", "metric", "unit",
    "value", "baseline_name", "baseline_value", "ratio", "limit_value", "of_limit", "card",
    "n_gpus", "torch", "git_sha",
}  # fmt: skip


def parse(scenario: ModuleType, argv: str) -> argparse.Namespace:
    """`argv` (split on whitespace) parsed by the options of `scenario` (its add_arguments)."""
    parser = argparse.ArgumentParser()
    scenario.add_arguments(parser)
    return parser.parse_args(argv.split())


def run_scenario(scenario: ModuleType, argv: str, out: Path) -> list[dict]:
    """Runs `scenario` on `argv` with `--out out`; checks that it succeeded and wrote exactly
    one results file, named for the scenario, into `out` (empty before); returns its records."""
    assert scenario.main(parse(scenario, f"{argv} --out {out}")) == 0
    (path,) = out.iterdir()
    assert path.name.endswith(f"-{scenario.SCENARIO}.json")
    return json.loads(path.read_text())


def run_interpreted(scenario: str, argv: str, out: Path) -> list[dict]:
    """`energon bench SCENARIO argv --out out` in a process of its own with TRITON_INTERPRET=1
    (the interpreter must be chosen before triton is imported, and this process has imported
    it); checks that it succeeded and wrote one results file into `out`; returns its records."""
    args = ["bench", scenario, *argv.split(), "--out", str(out)]
    script = f"import sys; from energon.cli import main; sys.exit(main({args!r}))"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = out.iterdir()
    return json.loads(path.read_text())
