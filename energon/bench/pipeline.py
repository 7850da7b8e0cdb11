"""`energon bench pipeline`: throughput at pp = 1, 2, 4 (or any tp x pp layouts), non-blocking
against blocking, a timeline.

Each layout is one Engine (its default steps in flight: pp with lookahead) serving `--requests`
prompts of `--prompt-len` tokens for `--gen-len` new tokens, all submitted at once; throughput is
output tokens over the wall time from submission to the last completion (prefill included). The
largest pp runs again with one step in flight (blocking: the controller waits for each step before
sending the next), the baseline of the non-blocking pipeline. `--layouts 8x1,4x2,2x4,1x8` (tp x pp)
replaces `--tp`/`--pp`: the 8-GPU table of the scaling issue. Records:

- `throughput` of each layout, against the first layout of the same run (pp=1 by default; ratio =
  the speed-up); ceiling = the
  step-wise roofline of one card (prefill FLOPs / matmul rate, then each decode step's weights
  and KV bytes / bandwidth) times the cards the run uses (1 on cpu: the stages share it);
- `nonblocking_vs_blocking` at the largest pp: the non-blocking rate against the blocking one;
- `throughput_{N}_in_flight` for each `--more-in-flight K`: the largest pp with N = pp + K steps
  (micro-batches) in flight, against the first layout (K = 0: as many as stages);
- `throughput_lookahead_off` with `--lookahead on,off`: the largest pp without lookahead (the
  controller feeds every step's tokens; its default pp + 1 micro-batches), against the first
  layout. With lookahead (the default) the last stage hands each micro-batch's tokens to the
  first, which runs its next step without waiting for the controller.

`--trace PNG` draws each stage's waiting and working spans over a steady window of the largest
pp's non-blocking and blocking runs (energon/bench/trace.py) and records how much of each run
two stages worked at once. `--profile-dir DIR`: after the timed runs of each pp > 1 (default
steps in flight), every worker runs one decode step of about requests / pp sequences (a
micro-batch; `generate.profile_matches`) under torch.profiler and writes its chrome trace
(`python bench/kernel_path.py` reads them): what each stage's share of a decode round is made
of.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from energon.bench.generate import (
    CHILD_ENV,
    TimedEngine,
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
from energon.bench.record import Record, card_name, torch_version, write_results
from energon.bench.trace import decode_steps, overlap_fraction, timeline_png, turnaround
from energon.engine import default_in_flight
from energon.models.registry import resolve
from energon.runner import pick_dtype
from energon.sampling import SamplingParams

SCENARIO = "pipeline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, tp=None)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of every run")
    parser.add_argument("--pp", default="1,2,4", help="comma-separated pipeline sizes")
    parser.add_argument(
        "--layouts", default=None, help="comma-separated TPxPP layouts (replace --tp and --pp)"
    )
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="tokens per step (default: the Engine's own: 8192 at pp=1, 4096 at pp > 1 since "
        "2026-11-28; the bench used 16384 before 2026-11-27)",
    )
    parser.add_argument(
        "--kv-reserve",
        type=float,
        default=0.0,
        help="the Engine's kv_reserve: share of the running requests' growth kept free when "
        "admitting (0, the default: fill the cache, preempt when it runs out; 1: never preempt)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per Engine (median)")
    parser.add_argument(
        "--warmup",
        default="full",
        choices=["full", "short"],
        help="full: one untimed run of the whole workload first (a first run meets kernel "
        "variants, Triton compiles or loads them, at step shapes a short warm-up does not "
        "reach); short: every prompt for 2 tokens only (the bench before 2026-11-28)",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt token ids")
    parser.add_argument(
        "--blocking", default="on", choices=["on", "off"], help="also the largest pp, blocking"
    )
    parser.add_argument(
        "--lookahead",
        default="on",
        help="on, or on,off: the largest pp also runs without lookahead (a record)",
    )
    parser.add_argument(
        "--more-in-flight",
        default="",
        help="comma-separated K: the largest pp also runs with pp + K steps in flight (micro-"
        "batches beyond the stages hide the controller's turnaround; 0: as many as stages); "
        "each a record",
    )
    parser.add_argument("--trace", default=None, help="write the stage timeline PNG here")
    parser.add_argument(
        "--profile-dir",
        default=None,
        help="profile one decode step of a micro-batch on every worker of each pp > 1 and "
        "write the chrome traces here",
    )
    parser.add_argument("--copy-mib", type=int, default=0, help="0: 1024 on cuda, 64 on cpu")
    parser.add_argument("--raw", default=None, help="also write every raw figure to this JSON file")


def parse_layouts(args) -> list[tuple[int, int]]:
    """(tp, pp) of each run: `--layouts` "TPxPP,..." or `--tp` with each of `--pp`."""
    if not args.layouts:
        return [(args.tp, int(p)) for p in args.pp.split(",")]
    layouts = []
    for item in args.layouts.split(","):
        tp, _, pp = item.strip().lower().partition("x")
        if not (tp.isdigit() and pp.isdigit() and int(tp) > 0 and int(pp) > 0):
            raise SystemExit(f"--layouts: {item!r} is not TPxPP (e.g. 2x4)")
        layouts.append((int(tp), int(pp)))
    return layouts


async def measure_pipeline(
    args, tp: int, pp: int, in_flight: int | None, device, dtype, prompts, kv, lookahead=True
) -> dict:
    """One Engine: a warm-up (`--warmup`), then `repeat` timed runs of every prompt at once
    (None steps in flight: the Engine's default)."""
    greedy = dict(temperature=0.0, ignore_eos=True)
    engine = TimedEngine(
        args.model,
        tp=tp,
        pp=pp,
        device=device,
        dtype=dtype,
        seed=args.seed,
        kv_cache_memory=kv,
        max_num_seqs=len(prompts),
        **({"max_batch_tokens": args.max_batch_tokens} if args.max_batch_tokens else {}),
        max_steps_in_flight=in_flight,
        lookahead=lookahead,
        kv_reserve=args.kv_reserve,
        progress=False,
    )
    in_flight = engine.max_steps_in_flight
    t0 = time.perf_counter()
    async with engine:
        start_s = time.perf_counter() - t0
        group = engine.group
        params = SamplingParams(max_tokens=args.gen_len, **greedy)
        warm = params if args.warmup == "full" else SamplingParams(max_tokens=2, **greedy)
        await asyncio.gather(*(engine.infer(p, warm) for p in prompts))
        infos = await group.broadcast("info")
        memory = await group.broadcast("memory")
        facts = await group.broadcast("bench_facts") if engine.timed else None
        if engine.timed:
            await group.broadcast("step_trace")  # drop the warm-up's steps
            await group.broadcast("step_log")
            await group.broadcast("host_trace")
            engine.controller_trace()
        runs, traces, hosts, logs = [], None, None, None
        for _ in range(args.repeat):
            preempted = engine.stats()["num_preemptions"]
            t = time.perf_counter()
            dones = await asyncio.gather(*(engine.infer(p, params) for p in prompts))
            wall = time.perf_counter() - t
            run = {"wall_s": wall, "tokens": sum(len(d.token_ids) for d in dones)}
            run["preemptions"] = engine.stats()["num_preemptions"] - preempted
            run["memory"] = await group.broadcast("memory")  # the allocator's counts so far
            runs.append(run)
            traces = await group.broadcast("step_trace") if engine.timed else None
            # the same steps' (start, end, sequences, new tokens, context), in the same order
            logs = await group.broadcast("step_log") if engine.timed else None
            hosts = await group.broadcast("host_trace") if engine.timed else None
            controller = engine.controller_trace()
        profiles = None
        if args.profile_dir and engine.timed and pp > 1 and in_flight == pp:
            profiles = await profile_decode_step(args.profile_dir, engine, prompts, infos)
    stages = stage_hosts = decodes = None
    if traces is not None:  # the last run's trace of each stage's tp rank 0
        stages = [traces[i] for i, info in enumerate(infos) if info["tp_rank"] == 0]
        decodes = [tokens == seqs for _, _, seqs, tokens, _ in logs[0]]  # one new token each
        stage_hosts = [hosts[i] for i, info in enumerate(infos) if info["tp_rank"] == 0]
    return {
        "tp": tp,
        "pp": pp,
        "in_flight": in_flight,
        "lookahead": engine.lookahead,
        "max_batch_tokens": engine.max_batch_tokens,
        "kv_reserve": engine.kv_reserve,
        "start_s": start_s,
        "runs": runs,
        "rate": statistics.median(r["tokens"] / r["wall_s"] for r in runs),
        "memory": memory,
        "facts": facts,
        "stage_traces": stages,
        "host_traces": stage_hosts,  # (entered, queued) of each step on each stage's host
        "overlap": overlap_fraction(stages) if stages else None,
        "turnaround": turnaround(stages, controller) if stages else None,
        "decode_steps": decode_steps(stages, decodes) if stages else None,
        "profiles": profiles,
    }


def _preemption_note(run: dict) -> str:
    """'kv_reserve R, P preemptions a run; ' (the counts of the timed runs)."""
    counts = ", ".join(str(r["preemptions"]) for r in run["runs"])
    return f"kv_reserve {run['kv_reserve']:g}, preemptions per run {counts}; "


async def profile_decode_step(folder: str, engine: TimedEngine, prompts, infos) -> list:
    """One decode step of a micro-batch (about requests / pp sequences) under torch.profiler on
    every worker, each writing `{folder}/tp{tp}-pp{pp}-decode{n}-rank{r}.json`; returns each
    stage's summary (its tp rank 0), None for a stage whose worker saw no such step."""
    n = max(1, len(prompts) // engine.pp)
    os.makedirs(folder, exist_ok=True)
    base = os.path.join(folder, f"tp{engine.tp}-pp{engine.pp}-decode{n}")
    group = engine.group
    await group.broadcast("arm_profile", n, False, base)
    # long enough that every prompt is computed while all still decode: pure decode steps of
    # about a micro-batch each follow
    short = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    await asyncio.gather(*(engine.infer(p, short) for p in prompts))
    results = await group.broadcast("profile_result")
    await group.broadcast("arm_profile", None)  # disarmed, should no step have matched
    return [results[i] for i, info in enumerate(infos) if info["tp_rank"] == 0]


def roofline_rate(args, run: dict, limit: dict, cards: int, kv_tok: int) -> float:
    """Output tokens/s if every step ran at its floor on `cards` cards of this `limit`: the
    prefill's FLOPs / matmul rate (or one weight read), then gen_len - 1 decode steps of the
    whole batch, each reading the weights and the batch's KV / bandwidth."""
    B, L, G = args.requests, args.prompt_len, args.gen_len
    weights = sum(m["param_bytes"] for m in run["memory"])
    mparams = sum(f["matmul_params"] for f in run["facts"]) if run["facts"] else weights / 2
    limits = (mparams, weights, kv_tok, limit["matmul_flops"], limit["copy_bytes_per_s"])
    prefill = step_floor(B * L, 0, *limits)
    decode = sum(step_floor(B, B * (L + k), *limits) for k in range(1, G))
    return cards * B * G / (prefill + decode)


def build_records(
    args,
    runs: list[dict],
    blocking: dict | None,
    limits: list[dict],
    on_cuda: bool,
    kv_tok: int,
    more: list[dict] = (),
    no_lookahead: dict | None = None,
) -> list[Record]:
    """The throughput of each layout against the first (`runs` is not empty), non-blocking
    against blocking, each of `more` (the largest pp with more steps in flight) against the
    first layout as `throughput_{N}_in_flight`, and `no_lookahead` (the largest pp without
    lookahead) as `throughput_lookahead_off`."""
    base = runs[0]
    facts = (base["facts"] or [{}])[0]
    common = dict(
        scenario=SCENARIO,
        model=args.model,
        dtype=facts.get("dtype"),
        batch=args.requests,
        prompt_len=args.prompt_len,
        gen_len=args.gen_len,
        card=facts.get("card", card_name()),
        torch=facts.get("torch", torch_version()),
    )
    limit = min(limits, key=lambda x: x["copy_bytes_per_s"])

    def rate_record(run: dict, metric: str, baseline: str, baseline_rate: float, notes: str):
        """A tokens/s point of `run` against `baseline_rate`, its ceiling on the run's cards."""
        cards = run["tp"] * run["pp"] if on_cuda else 1
        ceiling = roofline_rate(args, run, limit, cards, kv_tok)
        return Record(
            metric=metric,
            unit="tokens/s",
            value=run["rate"],
            tp=run["tp"],
            pp=run["pp"],
            baseline_name=baseline,
            baseline_value=baseline_rate,
            ratio=run["rate"] / baseline_rate,
            limit_value=ceiling,
            of_limit=run["rate"] / ceiling,
            n_gpus=cards if on_cuda else 0,
            notes=f"{notes}{_turnaround_note(run)}{_decode_note(run)}; ceiling = {cards} "
            "card(s) x the step-wise roofline of one",
            **common,
        )

    records = []
    for run in runs:
        rates = ", ".join(f"{r['tokens'] / r['wall_s']:.0f}" for r in run["runs"])
        records.append(
            rate_record(
                run,
                "throughput",
                f"Energon tp={base['tp']} pp={base['pp']}, same run",
                base["rate"],
                f"{args.requests} concurrent Engine.infer ({args.prompt_len}-token prompts, "
                f"{args.gen_len} new tokens greedy, ignore_eos), {run['in_flight']} steps in "
                f"flight, lookahead {_on(run)}, {run['max_batch_tokens']} tokens per step; "
                "output tokens / wall time, "
                f"median of {len(run['runs'])} ({rates} tokens/s) after a {args.warmup} "
                f"warm-up; {_preemption_note(run)}stages working at once "
                f"{_pct(run['overlap'])} of the run; engine start {run['start_s']:.1f} s",
            )
        )
    for run in more:
        records.append(
            rate_record(
                run,
                f"throughput_{run['in_flight']}_in_flight",
                f"Energon tp={base['tp']} pp={base['pp']}, same run",
                base["rate"],
                f"as throughput, with {run['in_flight']} steps in flight (micro-batches); stages "
                f"working at once {_pct(run['overlap'])} of the run",
            )
        )
    if no_lookahead is not None:
        records.append(
            rate_record(
                no_lookahead,
                "throughput_lookahead_off",
                f"Energon tp={base['tp']} pp={base['pp']}, same run",
                base["rate"],
                f"as throughput, without lookahead ({no_lookahead['in_flight']} steps in flight, "
                "each micro-batch's next step sent once its reply is in); stages working at once "
                f"{_pct(no_lookahead['overlap'])} of the run",
            )
        )
    if blocking is not None:
        nb = next(r for r in runs if (r["tp"], r["pp"]) == (blocking["tp"], blocking["pp"]))
        records.append(
            rate_record(
                nb,
                "nonblocking_vs_blocking",
                f"blocking pipeline (1 step in flight), pp={nb['pp']}, same run",
                blocking["rate"],
                f"stages working at once: non-blocking {_pct(nb['overlap'])}, blocking "
                f"{_pct(blocking['overlap'])} of the run",
            )
        )
    return records


def _on(run: dict) -> str:
    return "on" if run["lookahead"] else "off"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _turnaround_note(run: dict) -> str:
    """Where a micro-batch waits between its steps (energon.bench.trace.turnaround)."""
    t = run.get("turnaround")
    if not t:
        return ""

    def ms(key: str) -> str:
        return "n/a" if t[key] is None else f"{t[key] * 1e3:.2f} ms"

    return (
        f"; between a micro-batch's steps (medians over {t['steps']} steps): last stage's output "
        f"-> reply in the controller {ms('reply_s')}, -> next step sent {ms('control_s')} "
        f"(applying a reply {ms('apply_s')}), sent -> the idle first stage starting it "
        f"{ms('deliver_s')}; controller applying replies {_pct(t['busy'])} of the run"
    )


def _decode_note(run: dict) -> str:
    """Each stage's work on the steps that only decode (energon.bench.trace.decode_steps)."""
    d = run.get("decode_steps")
    if not d or run["pp"] < 2:
        return ""

    def ms(xs: list) -> str:
        return " / ".join("n/a" if x is None else f"{x * 1e3:.2f}" for x in xs)

    return (
        f"; steps that only decode ({d['steps']}), medians: each stage's work {ms(d['work_s'])} "
        f"ms, from each stage's output to the next one's input {ms(d['hop_s'])} ms"
    )


def main(args: argparse.Namespace) -> int:
    os.environ.update(CHILD_ENV)
    gpus = visible_gpus()
    device = resolve_device(args.device, gpus)
    on_cuda = device == "cuda"
    config = resolve(args.model).config
    dev = torch.device("cuda", 0) if on_cuda else torch.device("cpu")
    dtype = pick_dtype(args.dtype, config, dev)
    dtype_name = str(dtype).removeprefix("torch.")
    layouts = parse_layouts(args)
    if on_cuda:
        for tp, pp in [x for x in layouts if x[0] * x[1] > gpus]:
            print(f"skip tp={tp} pp={pp}: tp*pp > {gpus} GPU(s) visible", flush=True)
        layouts = [(tp, pp) for tp, pp in layouts if tp * pp <= gpus]
    if not layouts:
        print("nothing to measure", file=sys.stderr)
        return 1
    prompts = make_prompts(config["vocab_size"], args.requests, args.prompt_len, args.seed)
    per_tok = kv_bytes_per_token(config, dtype)
    tokens = args.requests * (args.prompt_len + args.gen_len + 16)
    # on cpu a cache for the whole workload; on cuda what the card holds (the workload's KV
    # of 256 x 656 tokens of a 13B model is ~140 GB: it runs in waves)
    kv = int(1.3 * per_tok * tokens) + (64 << 20) if per_tok and not on_cuda else None
    copy_bytes = (args.copy_mib or (1024 if on_cuda else 64)) << 20
    size = pick_matmul_size(args, device)
    world = max(tp * pp for tp, pp in layouts)
    limits = measure_limits(device, world if on_cuda else 1, size, copy_bytes, dtype)
    print(f"energon bench pipeline: {args.model} ({dtype_name}) on {device}, {layouts}", flush=True)

    runs = []
    for tp, pp in layouts:
        print(f"tp={tp} pp={pp}: {default_in_flight(pp)} steps in flight", flush=True)
        try:
            run = measure_pipeline(args, tp, pp, None, device, dtype_name, prompts, kv)
            runs.append(_run_async(run))
        except Exception as exc:  # noqa: BLE001 - e.g. a layout whose shards do not fit
            print(f"tp={tp} pp={pp} failed: {exc!r}", flush=True)
            continue
        print(f"tp={tp} pp={pp}: {runs[-1]['rate']:.1f} tokens/s", flush=True)
    if not runs:
        print("no layout ran", file=sys.stderr)
        return 1
    top = max(runs, key=lambda r: (r["pp"], -r["tp"]))
    blocking = None
    if args.blocking == "on" and top["pp"] > 1:
        tp, pp = top["tp"], top["pp"]
        print(f"tp={tp} pp={pp}: 1 step in flight (blocking)", flush=True)
        run = measure_pipeline(args, tp, pp, 1, device, dtype_name, prompts, kv, False)
        blocking = _run_async(run)
        print(f"tp={tp} pp={pp} blocking: {blocking['rate']:.1f} tokens/s", flush=True)

    no_lookahead = None
    modes = {m.strip() for m in args.lookahead.split(",") if m.strip()}
    if not modes <= {"on", "off"} or "on" not in modes:
        raise SystemExit(f"--lookahead takes on or on,off (got {args.lookahead!r})")
    if "off" in modes and top["pp"] > 1:
        tp, pp = top["tp"], top["pp"]
        print(f"tp={tp} pp={pp}: lookahead off", flush=True)
        run = measure_pipeline(args, tp, pp, None, device, dtype_name, prompts, kv, False)
        no_lookahead = _run_async(run)
        print(f"tp={tp} pp={pp} lookahead off: {no_lookahead['rate']:.1f} tokens/s", flush=True)

    more = []
    for extra in [int(k) for k in args.more_in_flight.split(",") if k.strip()]:
        tp, pp, n = top["tp"], top["pp"], top["pp"] + extra
        print(f"tp={tp} pp={pp}: {n} steps in flight", flush=True)
        more.append(_run_async(measure_pipeline(args, tp, pp, n, device, dtype_name, prompts, kv)))
        print(f"tp={tp} pp={pp} with {n} in flight: {more[-1]['rate']:.1f} tokens/s", flush=True)

    records = build_records(args, runs, blocking, limits, on_cuda, per_tok or 0, more, no_lookahead)
    path = write_results(SCENARIO, records, Path(args.out) if args.out else None)
    if args.raw:
        raw = {"args": vars(args), "limits": limits, "runs": runs, "blocking": blocking}
        raw["more_in_flight"] = more
        raw["lookahead_off"] = no_lookahead
        Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
        Path(args.raw).write_text(json.dumps(raw, indent=1, default=str) + "\n")
    if args.trace:
        panels = [(f"pp={top['pp']}, non-blocking ({top['in_flight']} steps in flight)", top)]
        if blocking is not None:
            panels.append((f"pp={blocking['pp']}, blocking (1 step in flight)", blocking))
        panels = [(title, run["stage_traces"]) for title, run in panels if run["stage_traces"]]
        if panels:
            print(f"wrote {timeline_png(panels, args.trace)}", flush=True)
    for r in records:
        print(f"tp={r.tp} pp={r.pp} {r.metric}: {r.value:.1f} {r.unit}, ratio {r.ratio}, of_limit "
              f"{r.of_limit:.3f}; {r.notes}")  # fmt: skip
    print(f"wrote {path}")
    return 0
