"""`energon bench forward`: one forward pass, padding-free against padded, next to the matmul floor.

Issue 3: the `opt-13b` preset (fp16) on 32 sequences with lengths uniform in [64, 1024] (about
half padding when padded to the longest), at tp=1 and tp=2. For each tp the workers (ModelRunner
inside `energon.bench.timed_runner.TimedRunner`, spawned through `energon.actors`) measure their
card's matmul rate and copy bandwidth, then time the padding-free pass and the padded baseline,
alternating, with logits computed for each sequence's last token only.

Floor = 2 * matmul_params_per_gpu * real_tokens / matmul rate (the decoder layers' matrices, the
weights every token multiplies; embedding lookups cost no FLOPs; attention scores are left out).
Goal: padding-free >= 1.7x faster than padded and within 1.25x of the floor (of_limit >= 0.8).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys

from energon.actors.transport import free_port
from energon.bench.options import (
    add_model_arguments,
    pick_matmul_size,
    resolve_device,
    visible_gpus,
)
from energon.bench.record import Record, write_results
from energon.models.registry import resolve
from energon.parallel.topology import NO_MULTICAST_ENV

SCENARIO = "forward"
ACTOR = "energon.bench.timed_runner:TimedRunner"
CHILD_ENV = NO_MULTICAST_ENV  # NVLink multicast off, in every child process too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, tp="1,2")
    parser.add_argument("--seqs", type=int, default=32, help="sequences in the batch")
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="weights, lengths and token ids")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes of each path")
    parser.add_argument("--repeat", type=int, default=7, help="timed passes of each path")
    parser.add_argument("--profile", action="store_true", help="print a profile of each path")


def make_batch(vocab: int, seqs: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    """Seeded lengths uniform in [min_len, max_len] and seeded token ids in [4, vocab)."""
    rng = random.Random(seed)
    lengths = [rng.randint(min_len, max_len) for _ in range(seqs)]
    return [[rng.randrange(4, vocab) for _ in range(n)] for n in lengths]


async def measure(args, tp: int, device: str, batch: list[list[int]]) -> dict:
    """Spawn tp workers, measure the card and both paths; returns the raw figures of rank 0
    (timings are per rank; a tp step waits for the slowest, so the max over ranks is kept)."""
    from energon.actors import ActorGroup

    kwargs = dict(
        model=args.model,
        tp=tp,
        pp=1,
        dtype=args.dtype,
        device=device,
        init_method=f"tcp://127.0.0.1:{free_port()}",
        seed=args.seed,
    )
    size = pick_matmul_size(args, device)
    copy_bytes = (1 << 30) if device == "cuda" else (64 << 20)
    group = await ActorGroup.spawn(
        ACTOR, tp, kwargs=kwargs, env=CHILD_ENV, heartbeat_timeout=120.0, start_timeout=600.0
    )
    try:
        facts = await group.broadcast("facts")
        limits = await group.broadcast("limits", size, copy_bytes)
        kinds = (await group.broadcast("attention_paths"))[0] + ["padded"]
        for _ in range(args.warmup):
            for kind in kinds:
                await group.broadcast("time_forward", kind, batch, 1)
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(args.repeat):  # alternate, so drift hits every path alike
            for kind in kinds:
                per_rank = await group.broadcast("time_forward", kind, batch, 1)
                times[kind].append(max(r[0] for r in per_rank))
        agreement = (await group.broadcast("agreement", batch))[0]
        profiles = {}
        if args.profile:
            for kind in ("packed", "padded"):
                profiles[kind] = (await group.broadcast("profile", kind, batch))[0]
        await group.broadcast("close")
    finally:
        await group.shutdown()
    return {
        "facts": facts,
        "limits": limits,
        "times": times,
        "agreement": agreement,
        "matmul_size": size,
        "profiles": profiles,
    }


def build_records(args, tp: int, run: dict, batch: list[list[int]]) -> list[Record]:
    """The padding-free point (baseline: padded) and the card's two measured ceilings."""
    facts, limits = run["facts"][0], run["limits"]
    rate = min(lim["matmul_flops"] for lim in limits)  # the slowest card paces the step
    bandwidth = min(lim["copy_bytes_per_s"] for lim in limits)
    real = sum(len(s) for s in batch)
    padded = len(batch) * max(len(s) for s in batch)
    params_per_gpu = max(f["matmul_params"] for f in run["facts"])
    floor = 2 * params_per_gpu * real / rate
    packed_t, padded_t = run["times"]["packed"], run["times"]["padded"]
    packed_s, padded_s = statistics.median(packed_t), statistics.median(padded_t)
    agree = run["agreement"] or {}
    common = dict(
        scenario=SCENARIO,
        model=args.model,
        dtype=facts["dtype"],
        tp=tp,
        pp=1,
        batch=len(batch),
        prompt_len=round(real / len(batch)),
        gen_len=0,
        card=facts["card"],
        n_gpus=tp if facts["device"].startswith("cuda") else 0,
        torch=facts["torch"],
    )
    notes = (
        f"median of {len(packed_t)} alternating passes; padding-free {min(packed_t):.4f}-"
        f"{max(packed_t):.4f} s, padded {min(padded_t):.4f}-{max(padded_t):.4f} s; "
        f"real tokens {real}, padded tokens {padded} ({1 - real / padded:.0%} padding, so a "
        f"ratio of at most ~{padded / real:.2f} from tokens alone); lengths "
        f"uniform [{args.min_len}, {args.max_len}], seed {args.seed}; floor = 2 * "
        f"{params_per_gpu} matmul params per GPU * {real} tokens / {rate / 1e12:.4g} TFLOP/s "
        f"(slowest rank's {run['matmul_size']}^3 matmul); padded of_limit "
        f"{floor / padded_s:.3f}; last-token logits max |packed - padded| "
        f"{agree.get('max_abs_diff', float('nan')):.3g} of max {agree.get('max_abs', float('nan')):.3g}, "
        f"same argmax {agree.get('same_argmax')}; worker build (random init) "
        f"{max(f['build_s'] for f in run['facts']):.1f} s"
    )

    def against_padded(seconds: float) -> dict:
        """A pass of `seconds` against the padded baseline and the floor."""
        return dict(
            unit="s",
            value=seconds,
            baseline_name="padded",
            baseline_value=padded_s,
            ratio=padded_s / seconds,
            limit_value=floor,
            of_limit=floor / seconds,
        )

    records = [
        Record(metric="forward_time", notes=notes, **against_padded(packed_s), **common),
        Record(
            metric="matmul_rate", unit="TFLOP/s", value=rate / 1e12, notes="slowest rank", **common
        ),  # fmt: skip
        Record(
            metric="copy_bandwidth",
            unit="GB/s",
            value=bandwidth / 1e9,
            notes="device-to-device, bytes read + written; slowest rank",
            **common,
        ),  # fmt: skip
    ]
    if "packed-grid" in run["times"]:  # the same pass with attention on the SDPA grid path
        grid_t = run["times"]["packed-grid"]
        grid_s = statistics.median(grid_t)
        records.append(
            Record(
                metric="forward_time_grid_attention",
                notes=f"padding-free with the flash varlen kernel switched off (queries scattered "
                f"to a [B, Lmax] grid, SDPA with a mask); {min(grid_t):.4f}-{max(grid_t):.4f} s",
                **against_padded(grid_s),
                **common,
            )
        )
    return records


def print_table(records: list[Record]) -> None:
    print(
        f"\n{'tp':>3} {'padding-free s':>15} {'padded s':>10} {'ratio':>6} {'floor s':>9} "
        f"{'of_limit':>8} {'TFLOP/s':>8} {'copy GB/s':>9} {'grid-attn s':>11}  card"
    )
    by_tp: dict[int, dict[str, Record]] = {}
    for r in records:
        by_tp.setdefault(r.tp, {})[r.metric] = r
    for tp, rs in sorted(by_tp.items()):
        f, m, c = rs["forward_time"], rs["matmul_rate"], rs["copy_bandwidth"]
        grid = rs.get("forward_time_grid_attention")
        grid_s = f"{grid.value:>11.4f}" if grid else f"{'-':>11}"
        print(
            f"{tp:>3} {f.value:>15.4f} {f.baseline_value:>10.4f} {f.ratio:>6.2f} "
            f"{f.limit_value:>9.4f} {f.of_limit:>8.3f} {m.value:>8.4g} {c.value:>9.4g} {grid_s}  "
            f"{f.card}"
        )
    print("goal: ratio >= 1.70 and of_limit >= 0.80 (within 1.25x of the floor)")


def main(args: argparse.Namespace) -> int:
    os.environ.update(CHILD_ENV)
    gpus = visible_gpus()
    device = resolve_device(args.device, gpus)
    vocab = resolve(args.model).config["vocab_size"]
    batch = make_batch(vocab, args.seqs, args.min_len, args.max_len, args.seed)
    real = sum(len(s) for s in batch)
    width = max(len(s) for s in batch)
    print(
        f"energon bench forward: {args.model} on {device}, {len(batch)} sequences, "
        f"{real} tokens ({len(batch) * width} padded), tp {args.tp}",
        flush=True,
    )
    records: list[Record] = []
    for tp in (int(t) for t in args.tp.split(",")):
        if device == "cuda" and tp > gpus:
            print(f"skip tp={tp}: {gpus} GPU(s) visible", flush=True)
            continue
        run = asyncio.run(measure(args, tp, device, batch))
        points = build_records(args, tp, run, batch)
        records += points
        write_results(SCENARIO, records, args.out)  # after every tp: a later failure keeps these
        for kind, table in run["profiles"].items():
            print(f"\nprofile tp={tp} {kind}:\n{table}", flush=True)
        print(f"tp={tp}: {points[0].notes}", flush=True)
    if not records:
        print("nothing measured", file=sys.stderr)
        return 1
    print_table(records)
    path = write_results(SCENARIO, records, args.out)
    print(f"wrote {path}")
    return 0
