"""`energon bench actors`: the actor runtime against its baselines, in one run on one machine.

Round-trip latency (median, p99) of an empty call and of calls echoing 1 MiB and 64 MiB tensors,
and calls/s with 1,000 calls in flight, for Energon, a bare synchronous pyzmq + msgpack echo (the
floor for any ZeroMQ runtime in Python), torch.distributed.rpc and Ray actors. The 64 MiB echo is
also set against a plain memory copy of the same bytes (there and back).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from energon.bench import actors_baselines as baselines
from energon.bench.record import Record, write_results

MIB = baselines.MIB
SCENARIO = "actors"


class BenchActor:
    """What every runtime hosts: a no-op and an echo."""

    def ping(self):
        return None

    def echo(self, x):
        return x

    async def aping(self):
        return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["bare", "torch-rpc", "ray"])
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop",
                        help="the controller's event loop (default uvloop)")  # fmt: skip
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")


async def measure_energon(sizes: dict[str, int], n: int, n_large: int, window: int, rounds: int):
    """Energon's figures: {metric: seconds or calls/s}, keyed like the baselines'."""
    import torch

    from energon.actors import ActorGroup

    out: dict[str, float] = {}
    async with await ActorGroup.spawn(BenchActor, 1) as group:
        actor = group[0]

        async def lat(method, *args, reps):
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                await actor.call(method, *args)
                samples.append(time.perf_counter() - t0)
            return samples

        await lat("ping", reps=500)
        await lat("aping", reps=200)
        out.update(baselines.summarise("empty", await lat("ping", reps=n)))
        out.update(baselines.summarise("empty async", await lat("aping", reps=n)))
        for name, size in sizes.items():
            t = torch.randn(size // 4)
            reps = n_large if size >= 16 * MIB else n // 4
            await lat("echo", t, reps=3)
            out.update(baselines.summarise(name, await lat("echo", t, reps=reps)))
        for method, key in (("ping", "calls/s"), ("aping", "calls/s async")):
            await asyncio.gather(*(actor.call(method) for _ in range(window)))
            t0 = time.perf_counter()
            for _ in range(rounds):
                await asyncio.gather(*(actor.call(method) for _ in range(window)))
            out[key] = rounds * window / (time.perf_counter() - t0)
    return out


def memcpy_seconds(size: int, reps: int = 10) -> float:
    """Median time of one plain copy of size bytes on this machine: the faster of torch's copy_
    (multi-threaded) and numpy's copyto (one thread, memcpy), so the limit is the tighter one."""
    import numpy as np
    import torch

    src, dst = torch.randn(size // 4), torch.empty(size // 4)
    a, b = src.numpy(), dst.numpy()
    dst.copy_(src)
    np.copyto(b, a)
    return min(
        statistics.median(baselines.timed(lambda: dst.copy_(src), reps)),
        statistics.median(baselines.timed(lambda: np.copyto(b, a), reps)),
    )


def run_energon(args, sizes, n, n_large, window, rounds) -> dict:
    coro = measure_energon(sizes, n, n_large, window, rounds)
    if args.loop == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def main(args: argparse.Namespace) -> int:
    n, n_large, window, rounds = (300, 5, 1000, 3) if args.quick else (3000, 20, 1000, 10)
    sizes = {"1 MiB": MIB, "64 MiB": 64 * MIB}
    print(f"energon bench actors: {n} calls per latency point, {window} in flight x {rounds}")
    runs = {}
    errors = {}
    candidates = {
        "energon": lambda: run_energon(args, sizes, n, n_large, window, rounds),
        "bare": lambda: baselines.run_bare(sizes, n, n_large, window, rounds),
        "torch-rpc": lambda: baselines.run_torch_rpc(sizes, n, n_large, window, rounds),
        "ray": lambda: baselines.run_ray(sizes, n, n_large, window, rounds),
    }
    for name, fn in candidates.items():
        if name in args.skip:
            errors[name] = "skipped (--skip)"
            continue
        t0 = time.perf_counter()
        try:
            runs[name] = fn()
        except baselines.BaselineUnavailable as exc:
            errors[name] = str(exc)
        print(
            f"  {name}: {'done' if name in runs else errors[name]} ({time.perf_counter() - t0:.0f} s)"
        )
    if "energon" not in runs:
        print("energon did not run")
        return 1
    # the bare echo is the tightest comparison: measure it and Energon's empty call once more, in
    # the other order, and keep each side's better median (the machine is shared and noisy)
    if "bare" in runs:
        again_bare = baselines.run_bare({}, n, n_large, window, 1)
        again = run_energon(args, {}, n, n_large, window, 1)
        for key in ("empty median", "empty p99"):
            runs["bare"][key] = min(runs["bare"][key], again_bare[key])
            runs["energon"][key] = min(runs["energon"][key], again[key])
    copy_s = memcpy_seconds(64 * MIB)
    records = build_records(runs, copy_s, args)
    print_table(records, errors)
    path = write_results(SCENARIO, records, args.out)
    print(f"wrote {path}")
    return 0


LATENCIES = [
    ("empty median", "empty-call round trip, median"),
    ("empty p99", "empty-call round trip, p99"),
    ("1 MiB median", "1 MiB tensor echo, median"),
    ("1 MiB p99", "1 MiB tensor echo, p99"),
    ("64 MiB median", "64 MiB tensor echo, median"),
    ("64 MiB p99", "64 MiB tensor echo, p99"),
]
BASELINE_NAMES = {
    "bare": "bare pyzmq+msgpack echo",
    "torch-rpc": "torch.distributed.rpc",
    "ray": "Ray actor",
}


def build_records(runs: dict, copy_s: float, args) -> list[Record]:
    e = runs["energon"]
    note = f"controller loop {args.loop}; worker loop uvloop; sync method unless 'async'"
    records = []
    for key, metric in LATENCIES:
        for name, run in runs.items():
            if name == "energon":
                continue
            records.append(Record(SCENARIO, metric, "us", e[key] * 1e6, baseline_name=BASELINE_NAMES[name],
                                  baseline_value=run[key] * 1e6, ratio=run[key] / e[key], notes=note))  # fmt: skip
    for key, metric in (("empty async median", "empty async-method call, median"),):
        bare = runs.get("bare")
        records.append(Record(SCENARIO, metric, "us", e[key] * 1e6,
                              baseline_name=BASELINE_NAMES["bare"] if bare else None,
                              baseline_value=bare["empty median"] * 1e6 if bare else None,
                              ratio=bare["empty median"] / e[key] if bare else None, notes=note))  # fmt: skip
    for key in ("calls/s", "calls/s async"):
        for name, run in runs.items():
            if name == "energon":
                continue
            metric = "calls/s, 1000 in flight" + (" (async method)" if "async" in key else "")
            records.append(Record(SCENARIO, metric, "calls/s", e[key], baseline_name=BASELINE_NAMES[name],
                                  baseline_value=run["calls/s"], ratio=e[key] / run["calls/s"], notes=note))  # fmt: skip
    # 64 MiB there and back against a plain copy of the same 128 MiB
    moved = 2 * 64 * MIB
    rate = moved / e["64 MiB median"] / 1e9
    limit = moved / (2 * copy_s) / 1e9
    records.append(Record(SCENARIO, "64 MiB echo throughput (bytes there and back / time)", "GB/s", rate,
                          baseline_name="plain memory copy (best of torch copy_, numpy copyto)", baseline_value=limit,
                          ratio=rate / limit, limit_value=limit, of_limit=rate / limit, notes=note))  # fmt: skip
    return records


def print_table(records: list[Record], errors: dict) -> None:
    print(f"\n{'metric':<58} {'energon':>10} {'baseline':>10} {'ratio':>7}  baseline")
    for r in records:
        base = f"{r.baseline_value:10.1f}" if r.baseline_value is not None else " " * 10
        ratio = f"{r.ratio:7.2f}" if r.ratio is not None else " " * 7
        print(
            f"{r.metric + ' [' + r.unit + ']':<58} {r.value:10.1f} {base} {ratio}  {r.baseline_name}"
        )
    for name, why in errors.items():
        print(f"not measured: {name}: {why}")
    print(
        "ratio > 1: Energon is better (baseline time / Energon time, or Energon rate / baseline rate)"
    )
