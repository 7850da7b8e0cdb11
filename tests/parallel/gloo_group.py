"""Run a function on every rank of a small gloo group of spawned processes (tests only)."""

from __future__ import annotations

import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from energon.actors.transport import free_port
from energon.parallel.topology import Topology, init_parallel, use_parallel


def _entry(fn, rank, tp, pp, port, args, queue):
    try:
        state = init_parallel(Topology(tp, pp), rank, f"tcp://127.0.0.1:{port}", "cpu")
        with use_parallel(state):
            result = fn(state, *args)
        queue.put((rank, "ok", result))
        dist.destroy_process_group()
    except BaseException:  # report to the parent, which re-raises
        queue.put((rank, "error", traceback.format_exc()))


def run_in_gloo_group(fn, tp: int = 1, pp: int = 1, *args, timeout: float = 60.0) -> list:
    """fn(state, *args) on each of tp*pp ranks; returns the results in rank order.

    Raises RuntimeError with the remote traceback when a rank fails.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn, r, tp, pp, port, args, queue), daemon=True)
        for r in range(tp * pp)
    ]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(tp * pp)]
