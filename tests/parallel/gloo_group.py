"""Run a function on every rank of a small gloo group of spawned processes (tests only)."""

from __future__ import annotations

from energon.parallel.ranks import run_ranks
from energon.parallel.topology import Topology


def run_in_gloo_group(fn, tp: int = 1, pp: int = 1, *args, timeout: float = 60.0) -> list:
    """fn(state, *args) on each of tp*pp ranks; returns the results in rank order.

    Raises RuntimeError with the remote traceback when a rank fails or does not answer."""
    return run_ranks(fn, Topology(tp, pp), "cpu", args, timeout)
