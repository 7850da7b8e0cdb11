"""Shared by the bench tests: the fields every BENCHMARKS.md record carries, and a scenario's
command line parsed as `energon bench SCENARIO` would parse it."""

from __future__ import annotations

import argparse
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
