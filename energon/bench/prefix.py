"""`energon bench prefix`: requests that share a long prefix (a system prompt), with prefix
caching against without it, on one card.

Workload: `--requests` prompts, each `--prefix-len` shared token ids then `--suffix-len` of its
own (seeded), `--gen-len` new tokens each, greedy, ignore_eos, submitted at once with
`asyncio.gather(engine.infer(...))`. Each Engine first runs one request of the prefix with another
suffix and a warm-up batch of the workload's shape; every timed run (`--repeat`, median) then
takes fresh suffixes, so only the prefix can be found cached. Metrics: throughput (output tokens /
wall time, submission to last completion) and the median request's first token
(`Completion.timings.first_token_s`). Baseline: the same Engine with `prefix_caching=False`, in
the same process right after. Limit: the step-wise roofline (energon/bench/limits.py) of the work
left when the prefix is cached: one step of every suffix (its FLOPs, or the weights and the KV it
attends), then gen_len - 1 decode steps of the batch (weights + KV / copy bandwidth); for the
first token, that first step's floor.

`--cold`: a burst of requests sharing a prefix that nobody computed before (a new system
prompt), so the burst must compute it. The warm-up and every timed run take a fresh prefix as
well as fresh suffixes, and the prefix is not run first. Three Engines, in the same process:
prefix caching as served (later requests wait for the step that computes the prefix, then adopt
it: energon/scheduler.py), the same with `ENERGON_PREFIX_WAIT=0` (each request admitted in the
first steps computes the prefix again; records `..._cold_no_prefix_wait`), and the baseline
without prefix caching. Limit: the prefix computed once (one step of its tokens), then one step
of every suffix attending its prefix, then the gen_len - 1 decode steps; for the first token,
the first two steps.

`--read-each`: one more Engine with prefix caching whose decode steps read the shared prefix for
every request (`ENERGON_SHARED_PREFIX=0`, as before energon/parallel/shared_prefix.py; records
`..._read_each`): the A/B of reading it once a step. Every record's notes count the decode
steps that read it once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import torch

from energon.bench.generate import (
    CHILD_ENV,
    _run_async,
    kv_bytes_per_token,
    make_prompts,
    measure_limits,
)
from energon.bench.limits import step_floor
from energon.bench.options import (
    add_model_arguments,
    pick_matmul_size,
    resolve_device,
    visible_gpus,
)
from energon.bench.record import Record, copy_bandwidth_record, print_records, write_results
from energon.engine import PREFIX_WAIT_ENV, Engine
from energon.models.registry import resolve
from energon.parallel.shared_prefix import SHARED_PREFIX_ENV
from energon.runner import pick_dtype
from energon.sampling import SamplingParams

SCENARIO = "prefix"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, tp=None)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1024, help="shared tokens")
    parser.add_argument("--suffix-len", type=int, default=64, help="each request's own tokens")
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cold",
        action="store_true",
        help="every run shares a prefix never computed before: prefix caching with requests "
        "waiting for it, with ENERGON_PREFIX_WAIT=0, and without prefix caching",
    )
    parser.add_argument(
        "--read-each",
        action="store_true",
        help="also an Engine whose decode steps read the shared prefix for every request "
        f"({SHARED_PREFIX_ENV}=0; records ..._read_each)",
    )


def workload(args, vocab: int, run: int) -> list[list[int]]:
    """The prompts of timed run `run` (-1: the warm-up): the shared prefix, then fresh suffixes.
    With --cold the prefix is fresh too: each run's own."""
    # the cold prefixes' seeds lie far from the suffixes' (seed + 2 + run)
    prefix_seed = args.seed + 1_000_000 + run if args.cold else args.seed
    [prefix] = make_prompts(vocab, 1, args.prefix_len, prefix_seed)
    suffixes = make_prompts(vocab, args.requests, args.suffix_len, args.seed + 2 + run)
    return [prefix + s for s in suffixes]


async def measure(
    args,
    caching: bool,
    device: str,
    dtype: str,
    vocab: int,
    wait: bool | None = None,
    worker_env: dict[str, str] | None = None,
) -> dict:
    """One Engine: the prefix once (not with --cold), a warm-up batch, then `repeat` timed
    batches. `wait` (True / False) overrides ENERGON_PREFIX_WAIT for this Engine; None leaves it.
    `worker_env`: the Engine's, e.g. ENERGON_SHARED_PREFIX=0 for decode steps that read the
    prefix for every request."""
    greedy = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)
    engine = Engine(
        args.model,
        device=device,
        dtype=dtype,
        seed=args.seed,
        max_num_seqs=args.requests,
        prefix_caching=caching,
        progress=False,
        worker_env=worker_env,
    )
    if wait is not None:  # what ENERGON_PREFIX_WAIT sets; the scheduler is made at start
        engine.prefix_wait = wait
    async with engine:
        if not args.cold:
            [prefix] = make_prompts(vocab, 1, args.prefix_len, args.seed)
            other = make_prompts(vocab, 1, args.suffix_len, args.seed + 1)[0]
            await engine.infer(prefix + other, SamplingParams(max_tokens=2, temperature=0.0))
        await asyncio.gather(*(engine.infer(p, greedy) for p in workload(args, vocab, -1)))
        memory = await engine.group.broadcast("memory")
        runs = []
        for run in range(args.repeat):
            hits = engine.stats()["prefix_cache_hit_tokens"]
            prompts = workload(args, vocab, run)
            t = time.perf_counter()
            done = await asyncio.gather(*(engine.infer(p, greedy) for p in prompts))
            wall = time.perf_counter() - t
            runs.append(
                {
                    "rate": sum(len(c.token_ids) for c in done) / wall,
                    "first_token_s": statistics.median(c.timings.first_token_s for c in done),
                    "hit_tokens": engine.stats()["prefix_cache_hit_tokens"] - hits,
                }
            )
        shared_steps = await shared_prefix_steps(engine)
    return {
        "rate": statistics.median(r["rate"] for r in runs),
        "first_token_s": statistics.median(r["first_token_s"] for r in runs),
        "hit_tokens": [r["hit_tokens"] for r in runs],
        "weights": sum(m["param_bytes"] for m in memory),
        "shared_steps": shared_steps,
    }


async def shared_prefix_steps(engine: Engine) -> int:
    """Decode steps so far that read a shared prefix once (the first stage's count)."""
    return (await engine.group.broadcast("info"))[0]["shared_prefix_steps"]


def floors(args, limit: dict, weights: float, kv_tok: float, element: int) -> tuple[float, float]:
    """(seconds to the first token, output tokens/s of the whole batch) at the roofline: with
    the prefix cached, one step of every suffix; with --cold, one step of the prefix before it
    (computed once: the least any engine does). Then gen_len - 1 decode steps. A step's K/V
    bytes count the shared prefix once: its blocks are the same for every request, so reading
    them once is the least a step can do (counted once a request, the batch's decode ran above
    that ceiling on an H200)."""
    B, P, S, G = args.requests, args.prefix_len, args.suffix_len, args.gen_len
    limits = (weights / element, weights, kv_tok, limit["matmul_flops"], limit["copy_bytes_per_s"])
    first = step_floor(B * S, P + B * S, *limits)
    if args.cold:
        first += step_floor(P, P, *limits)
    decode = sum(step_floor(B, P + B * (S + k), *limits) for k in range(1, G))
    return first, B * G / (first + decode)


def main(args: argparse.Namespace) -> int:
    os.environ.update(CHILD_ENV)
    device = resolve_device(args.device, visible_gpus())
    config = resolve(args.model).config
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    dtype = pick_dtype(args.dtype, config, dev)
    dtype_name = str(dtype).removeprefix("torch.")
    copy_bytes = (1024 if device == "cuda" else 64) << 20
    [limit] = measure_limits(device, 1, pick_matmul_size(args, device), copy_bytes, dtype)
    if device == "cuda":
        torch.cuda.empty_cache()  # the Engine's worker sizes its cache from what is free
    vocab = config["vocab_size"]
    print(f"energon bench prefix: {args.model} ({dtype_name}) on {device}", flush=True)
    if args.cold:
        on = _run_async(measure(args, True, device, dtype_name, vocab, wait=True))
        no_wait = _run_async(measure(args, True, device, dtype_name, vocab, wait=False))
    else:
        on = _run_async(measure(args, True, device, dtype_name, vocab))
    each = None
    if args.read_each:  # decode steps reading the prefix for every request
        each = _run_async(
            measure(args, True, device, dtype_name, vocab, worker_env={SHARED_PREFIX_ENV: "0"})
        )
    off = _run_async(measure(args, False, device, dtype_name, vocab))
    kv_tok = kv_bytes_per_token(config, dtype) or 0
    first_floor, rate_ceiling = floors(
        args, limit, on["weights"], kv_tok, torch.empty((), dtype=dtype).element_size()
    )
    common = dict(
        scenario=SCENARIO,
        model=args.model,
        dtype=dtype_name,
        batch=args.requests,
        prompt_len=args.prefix_len + args.suffix_len,
        gen_len=args.gen_len,
        baseline_name="the same Engine with prefix_caching=False",
        n_gpus=1 if device == "cuda" else 0,
    )
    found = f"tokens found cached per run {on['hit_tokens']} (without: {off['hit_tokens']})"
    if args.cold:
        found = (
            f"a new prefix each run; tokens found cached per run {on['hit_tokens']} "
            f"({PREFIX_WAIT_ENV}=0: {no_wait['hit_tokens']}; without: {off['hit_tokens']})"
        )
    shape = (
        f"{args.requests} requests of a shared {args.prefix_len}-token prefix + "
        f"{args.suffix_len} own tokens, {args.gen_len} new each; median of {args.repeat} runs; "
        f"{found}; decode steps reading the shared prefix once: {on['shared_steps']}; matmul "
        f"{limit['matmul_flops'] / 1e12:.0f} TFLOP/s, copy "
        f"{limit['copy_bytes_per_s'] / 1e9:.0f} GB/s (this run)"
    )
    limits = (rate_ceiling, first_floor, common)
    if args.cold:
        unwaited = f"{shape}; {PREFIX_WAIT_ENV}=0"
        records = [
            *engine_records(on, off, "_cold", shape, "one step of the prefix, then", *limits),
            *engine_records(
                no_wait,
                off,
                "_cold_no_prefix_wait",
                unwaited,
                "one step of the prefix, then",
                *limits,
            ),
        ]
    else:
        records = engine_records(on, off, "", shape, "with the prefix cached,", *limits)
    if each is not None:
        each_notes = (
            f"{shape}; {SHARED_PREFIX_ENV}=0: decode steps read the prefix for every request "
            f"(steps reading it once: {each['shared_steps']})"
        )
        lead = "one step of the prefix, then" if args.cold else "with the prefix cached,"
        records += engine_records(each, off, "_read_each", each_notes, lead, *limits)
    records.append(
        copy_bandwidth_record(SCENARIO, limit["copy_bytes_per_s"], n_gpus=common["n_gpus"])
    )
    print_records(records)
    print(f"\nwrote {write_results(SCENARIO, records, args.out)}")
    return 0


def engine_records(
    on: dict,
    off: dict,
    suffix: str,
    notes: str,
    lead: str,
    rate_ceiling: float,
    first_floor: float,
    common: dict,
) -> list[Record]:
    """The throughput and first-token records of an Engine measured as `on` against the
    baseline `off`: metric names end in `suffix`; `lead` says what the limit computes before
    the suffixes' step."""
    return [
        Record(
            metric="throughput" + suffix,
            unit="tokens/s",
            value=on["rate"],
            baseline_value=off["rate"],
            ratio=on["rate"] / off["rate"],
            limit_value=rate_ceiling,
            of_limit=on["rate"] / rate_ceiling,
            notes=f"{notes}; ceiling = step-wise roofline: {lead} every suffix, then the decodes",
            **common,
        ),
        Record(
            metric="first_token_ms" + suffix,
            unit="ms",
            value=on["first_token_s"] * 1e3,
            baseline_value=off["first_token_s"] * 1e3,
            ratio=off["first_token_s"] / on["first_token_s"],
            limit_value=first_floor * 1e3,
            of_limit=first_floor / on["first_token_s"],
            notes=f"{notes}; the median request's first token; floor = {lead} one step of "
            "every suffix attending its prefix",
            **common,
        ),
    ]
