"""`energon bench allreduce`: the tp all-reduce at decode sizes, one-shot against NCCL.

On N GPUs (`--gpus`, default 2), one process each (NCCL, NVLink multicast off), for each dtype of
`--dtypes` and each message size of `--sizes` (default 1 KiB .. 4 MiB, plus opt-13b's decode
message at batch 1, 5120 x 2 bytes), the latency of Energon's all-reduce (`OneShotAllReduce`,
energon/parallel/allreduce.py, set up by one_shot_setup.py with its threshold above the largest
size so that every size goes one-shot) against `dist.all_reduce`. bf16 is torch's one-shot kernel
alone (one kernel); fp16 is energon's Triton kernel (energon/kernels/one_shot.py), or without
triton, summed in fp32 around torch's (cast, kernel, cast back: no faster than NCCL inside a
graph on 2 H100s).

- eager: `--iters` calls back to back between two CUDA events, divided by iters (host launch cost
  included, as an eager step pays it);
- graph: `--iters` calls captured in one CUDA graph, each replay timed with CUDA events and
  divided by iters (how the decode graphs run them).

Each call reduces its own message from a pool of `--iters` (seeded random data, different on each
rank, restored before every timing). A point's time is the median over `--repeat` of the slowest
rank. Before timing, one call of each path on the same data is compared (exact for 2 ranks).

Floor: each rank must read (N-1) x S bytes from its peers over NVLink: (N-1) x S / the P2P
bandwidth, measured in the same run (every rank at once copying `--p2p-mib` from the next rank's
GPU through symmetric memory, bytes / time).
Also in the notes: the time of one S-byte copy kernel on the local GPU per graph node, what any
one-kernel all-reduce pays for being a kernel. `--device cpu` runs the same tables with gloo (no
graphs, no one-shot: Energon's path is the fallback), for the tests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from energon.bench.limits import copy_bandwidth
from energon.bench.options import visible_gpus
from energon.bench.record import (
    Record,
    card_name,
    print_records,
    torch_version,
    write_results,
)
from energon.parallel.one_shot_setup import set_up_one_shot, symmetric_memory
from energon.parallel.ranks import run_ranks
from energon.parallel.topology import NO_MULTICAST_ENV, Topology

SCENARIO = "allreduce"
DEFAULT_SIZES = "1K,2K,4K,8K,10K,16K,32K,64K,128K,256K,512K,1M,2M,4M"
BASELINES = {
    "nccl": "NCCL all_reduce (torch.distributed, NVLS off)",
    "gloo": "gloo all_reduce (torch.distributed)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=2, help="ranks, one GPU each (0: all)")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="message bytes, K = KiB, M = MiB")
    parser.add_argument("--dtypes", default="float16,bfloat16", help="comma-separated")
    parser.add_argument("--iters", type=int, default=64, help="all-reduces per timing")
    parser.add_argument("--repeat", type=int, default=10, help="timings per point")
    parser.add_argument("--p2p-mib", type=int, default=256, help="P2P bandwidth copy size")
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the whole group")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")


def parse_sizes(text: str) -> list[int]:
    """'1K,10K,4M' -> [1024, 10240, 4194304] (K = KiB, M = MiB); raises ValueError otherwise."""
    sizes = []
    for item in text.split(","):
        item = item.strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20}.get(item[-1:], 1)
        number = item[:-1] if scale > 1 else item
        if not number.isdigit() or int(number) <= 0:
            raise ValueError(f"--sizes: {item!r} is not a positive byte count like 10K or 4M")
        sizes.append(int(number) * scale)
    return sizes


# ------------------------------------------------------------------------------- one rank


class Timer:
    """Seconds per call of `iters` calls, per repetition: CUDA events on cuda, the clock on cpu."""

    def __init__(self, device: torch.device, iters: int, repeat: int):
        self.device, self.iters, self.repeat = device, iters, repeat
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def eager(self, fn, pool: list[torch.Tensor], group, reset) -> list[float]:
        for x in pool[:3]:  # warm up
            fn(x)
        samples = []
        for _ in range(self.repeat):
            reset()  # the messages' seeded values again (an all-reduce in place scales them)
            self.sync()
            dist.barrier(group=group)  # every rank starts together
            t0 = time.perf_counter()
            start, end = self._events()
            if start is not None:
                start.record()
            for x in pool:
                fn(x)
            if end is not None:
                end.record()
            self.sync()
            if start is not None:
                seconds = start.elapsed_time(end) / 1e3
            else:
                seconds = time.perf_counter() - t0
            samples.append(seconds / len(pool))
        return samples

    def graph(self, fn, pool: list[torch.Tensor], group, reset) -> list[float]:
        for x in pool[:3]:
            fn(x)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for x in pool:
                fn(x)
        graph.replay()  # warm up
        samples = []
        for _ in range(self.repeat):
            reset()
            self.sync()
            dist.barrier(group=group)
            start, end = self._events()
            start.record()
            graph.replay()
            end.record()
            self.sync()
            samples.append(start.elapsed_time(end) / 1e3 / len(pool))
        del graph
        return samples

    def _events(self):
        if not self.cuda:
            return None, None
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def slowest(samples: list[float], device: torch.device, group) -> list[float]:
    """Per repetition, the slowest rank's time (every rank gets the list)."""
    t = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def nccl_all_reduce(group):
    def reduce(x):
        dist.all_reduce(x, group=group)
        return x

    return reduce


def p2p_bandwidth(group, device: torch.device, nbytes: int, repeat: int = 10) -> float:
    """Bytes/s this rank reads from the next rank's GPU through a symmetric-memory mapping (the
    way a one-shot all-reduce reads), every rank at once; the slowest rank's median of `repeat`
    copies. Collective over `group`."""
    symm_mem = symmetric_memory()
    mine = symm_mem.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    handle = symm_mem.rendezvous(mine, group.group_name)
    theirs = handle.get_buffer((handle.rank + 1) % handle.world_size, (nbytes,), torch.uint8)
    local = torch.empty(nbytes, dtype=torch.uint8, device=device)
    samples = []
    for i in range(repeat + 2):
        torch.cuda.synchronize(device)
        dist.barrier(group=group)
        t0 = time.perf_counter()
        local.copy_(theirs)
        torch.cuda.synchronize(device)
        if i >= 2:
            samples.append(time.perf_counter() - t0)
    dist.barrier(group=group)  # no rank frees its buffer while a peer still reads it
    return nbytes / statistics.median(slowest(samples, device, group))


def copy_kernel_time(device: torch.device, nbytes: int, timer: Timer) -> float | None:
    """Seconds per S-byte local copy kernel replayed from a graph (None on cpu)."""
    if device.type != "cuda":
        return None
    pool = [torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device) for _ in range(2)]
    dst = torch.empty_like(pool[0])
    samples = timer.graph(dst.copy_, pool * max(timer.iters // 2, 1), None, lambda: None)
    return statistics.median(samples)


def measure_rank(state, opts: dict) -> dict:
    """Every point, measured on every rank (collective over the group); rank 0 returns them,
    the others None."""
    group, device, rank = state.tp_group, state.device, state.rank
    world = dist.get_world_size(group)
    sizes, dtypes = opts["sizes"], [getattr(torch, d) for d in opts["dtypes"]]
    timer = Timer(device, opts["iters"], opts["repeat"])
    max_bytes = max(sizes)
    if device.type == "cuda":
        fast, line = set_up_one_shot(group, device, max_bytes, float16_in_float32=True)
    else:
        fast, line = None, "gloo on cpu: Energon's all-reduce is the fallback"
    nccl = nccl_all_reduce(group)
    energon = fast if fast is not None else nccl
    modes = ["eager", "graph"] if device.type == "cuda" and fast is not None else ["eager"]
    points = []
    for dtype in dtypes:
        item = torch.empty((), dtype=dtype).element_size()
        for nbytes in sizes:
            n = max(nbytes // item, 1)
            g = torch.Generator().manual_seed(1000 * rank + n)
            source = torch.randn(n, generator=g).mul_(1e-2).to(dtype=dtype, device=device)
            pool = [source.clone() for _ in range(opts["iters"])]

            def reset(pool=pool, source=source):
                for x in pool:
                    x.copy_(source)

            exact = torch.equal(energon(source.clone()), nccl(source.clone()))
            point = {"dtype": str(dtype).removeprefix("torch."), "bytes": n * item, "exact": exact}
            for mode in modes:
                run = timer.eager if mode == "eager" else timer.graph
                for name, fn in (("energon", energon), ("nccl", nccl)):
                    samples = run(fn, pool, group, reset)
                    point[f"{name}_{mode}"] = slowest(samples, device, group)
            point["copy_kernel_s"] = copy_kernel_time(device, n * item, timer)
            points.append(point)
            del pool, source
    limits = {"copy_bytes_per_s": copy_bandwidth(device, 64 << 20), "p2p_bytes_per_s": None}
    if fast is not None:  # symmetric memory works here
        try:
            limits["p2p_bytes_per_s"] = p2p_bandwidth(group, device, opts["p2p_mib"] << 20)
        except (AttributeError, RuntimeError) as exc:  # alike on every rank: an API it lacks
            limits["p2p_error"] = repr(exc)
    dist.barrier(group=group)
    if rank != 0:
        return None
    return {
        "world": world,
        "backend": dist.get_backend(group),
        "line": line,
        "points": points,
        "limits": limits,
        "card": card_name(),
        "torch": torch_version(),
        "one_shot": fast is not None,
    }


# ------------------------------------------------------------------------------- records


def point_notes(p: dict, mode: str, result: dict, floor: float | None) -> str:
    """What a record's numbers are: the path, the spread, the check, the floor's terms."""
    mine, theirs = p[f"energon_{mode}"], p[f"nccl_{mode}"]
    backend, world, nbytes = result["backend"], result["world"], p["bytes"]
    parts = [
        f"bytes={nbytes}",
        result["line"],
        f"{mode}, per call: median over {len(mine)} timings of the slowest rank (energon "
        f"{min(mine) * 1e6:.2f}..{max(mine) * 1e6:.2f} us, {backend} "
        f"{min(theirs) * 1e6:.2f}..{max(theirs) * 1e6:.2f} us)",
        f"same result as {backend}: {p['exact']}",
    ]
    if floor is not None:
        parts.append(f"floor = {world - 1} x {nbytes} bytes read from peers / P2P bandwidth")
    if p["copy_kernel_s"] is not None:
        parts.append(f"one {nbytes}-byte copy kernel in a graph: {p['copy_kernel_s'] * 1e6:.2f} us")
    return "; ".join(parts)


def build_records(result: dict) -> list[Record]:
    """One record per (dtype, size, eager|graph): Energon's time against NCCL's (gloo's on cpu)
    and the NVLink floor; then the bandwidths measured."""
    world, limits = result["world"], result["limits"]
    p2p = limits.get("p2p_bytes_per_s")
    common = dict(
        scenario=SCENARIO,
        tp=world,
        card=result["card"],
        n_gpus=world if result["backend"] == "nccl" else 0,
        torch=result["torch"],
    )
    records = []
    for p in result["points"]:
        floor = (world - 1) * p["bytes"] / p2p if p2p else None
        for mode in ("eager", "graph"):
            if f"energon_{mode}" not in p:
                continue
            t = statistics.median(p[f"energon_{mode}"])
            base = statistics.median(p[f"nccl_{mode}"])
            records.append(
                Record(
                    metric=f"all_reduce_{mode}_{p['bytes']}B",
                    unit="us",
                    value=t * 1e6,
                    dtype=p["dtype"],
                    baseline_name=BASELINES.get(result["backend"], result["backend"]),
                    baseline_value=base * 1e6,
                    ratio=base / t,
                    limit_value=floor * 1e6 if floor else None,
                    of_limit=floor / t if floor else None,
                    notes=point_notes(p, mode, result, floor),
                    **common,
                )
            )
    records.append(
        Record(
            metric="copy_bandwidth",
            unit="GB/s",
            value=limits["copy_bytes_per_s"] / 1e9,
            notes="rank 0's device-to-device copy, bytes read + written",
            **common,
        )
    )
    if p2p:
        records.append(
            Record(
                metric="p2p_bandwidth",
                unit="GB/s",
                value=p2p / 1e9,
                notes="every rank at once copying from the next rank's GPU through symmetric "
                "memory, bytes / time, slowest rank",
                **common,
            )
        )
    return records


def main(args: argparse.Namespace) -> int:
    os.environ.update(NO_MULTICAST_ENV)  # inherited by the ranks
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    gpus = visible_gpus()
    device = args.device if args.device != "auto" else "cuda"
    world = args.gpus or gpus
    if device == "cuda" and (gpus < 2 or world < 2 or world > gpus):
        print(
            f"energon bench allreduce: skipped, it needs {max(world, 2)} GPUs and "
            f"{gpus} are visible (--device cpu runs it with gloo)"
        )
        return 0
    world = max(world, 2)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if not isinstance(getattr(torch, d, None), torch.dtype)]
    if bad or not dtypes:
        print(f"--dtypes: {bad or args.dtypes!r} is not a list of torch dtypes", file=sys.stderr)
        return 2
    opts = {
        "sizes": sizes,
        "dtypes": dtypes,
        "iters": args.iters,
        "repeat": args.repeat,
        "p2p_mib": args.p2p_mib,
    }
    print(
        f"energon bench allreduce: {world} ranks on {device}, {opts['dtypes']}, "
        f"{len(sizes)} sizes {sizes[0]}..{sizes[-1]} bytes, {args.iters} calls x {args.repeat}",
        flush=True,
    )
    t0 = time.perf_counter()
    try:
        result = run_ranks(measure_rank, Topology(world), device, (opts,), args.timeout)[0]
    except RuntimeError as exc:
        print(f"energon bench allreduce failed: {exc}", file=sys.stderr)
        return 1
    print(f"all-reduce path: {result['line']}")
    records = build_records(result)
    print_records(records, "dtype")
    path = write_results(SCENARIO, records, args.out)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f} s)")
    return 0
