"""Run a function on every rank of a small process group of spawned processes: the bench's
multi-GPU measurements (NCCL) and the tests' gloo groups."""

from __future__ import annotations

import faulthandler
import os
import pickle
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from energon.actors.transport import free_port
from energon.parallel.topology import NO_MULTICAST_ENV, Topology, init_parallel, use_parallel


def _rank_entry(fn, rank, topology, port, device, args, queue, timeout: float) -> None:
    os.environ.update(NO_MULTICAST_ENV)
    # a rank still running just before the parent gives up prints where each thread is
    faulthandler.dump_traceback_later(max(timeout - 5, 1))
    try:
        dev = f"cuda:{rank}" if device == "cuda" else "cpu"
        state = init_parallel(topology, rank, f"tcp://127.0.0.1:{port}", dev)
        with use_parallel(state):
            message = (rank, "ok", fn(state, *args))
    except BaseException:  # report to the parent
        message = (rank, "error", traceback.format_exc())
    try:  # by value: a queue shares a tensor through this process, which exits right after
        payload = pickle.dumps(message)
    except Exception:  # noqa: BLE001 - a result that cannot travel is this rank's error
        payload = pickle.dumps((rank, "error", traceback.format_exc()))
    queue.put(payload)
    # delivered before the teardown: a rank whose store (on rank 0) is gone can hang in it
    queue.close()
    queue.join_thread()
    faulthandler.cancel_dump_traceback_later()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_ranks(
    fn, topology: Topology, device: str, args: tuple = (), timeout: float = 300.0
) -> list:
    """fn(state, *args) on the topology's spawned ranks (NCCL on cuda:rank, or gloo on cpu, NVLink
    multicast off); their results (plain Python values) in rank order. Raises RuntimeError with
    the remote traceback when a rank fails, or when some rank has not answered within
    `timeout` seconds; the ranks are killed then, and when their teardown hangs."""
    world = topology.world_size
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [
        ctx.Process(
            target=_rank_entry,
            args=(fn, r, topology, port, device, args, queue, timeout),
            daemon=True,
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                payload = queue.get(timeout=max(deadline - time.monotonic(), 0.1))
            except Exception as exc:  # queue.Empty: a rank hangs, or died without a word
                missing = sorted(set(range(world)) - set(results))
                raise RuntimeError(
                    f"rank(s) {missing} did not answer within {timeout:.0f} s"
                ) from exc
            rank, status, value = pickle.loads(payload)
            if status == "error":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
