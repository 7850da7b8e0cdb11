"""`energon bench generate`: the Engine end to end, against HF transformers and the bandwidth floor.

For each tp the bench starts an `Engine` (random-weight preset, default `opt-13b` in fp16) and
measures, from the user's side of the API:

- decode latency at batch 1: one request, a seeded `--prompt-len` token-id prompt, `--gen-len` new
  tokens, greedy, ignore_eos; ms per output token = `Completion.timings.per_output_token_s`
  (first token to last, over gen_len - 1 gaps), median of `--repeat` requests. Floor = (weight
  bytes per GPU + KV bytes read at the mean decode context) / the copy bandwidth measured in the
  same run.
- throughput: `--batch` such requests at once through `asyncio.gather(engine.infer(...))`; output
  tokens / wall time from submission to the last completion, median of `--batch-repeat`. Ceiling =
  batch * gen_len / (prefill floor + the sum over decode steps of (weights + KV bytes read) /
  bandwidth).
- time to first token at batch 1 (extra), floor max(2 * matmul params * prompt / matmul rate,
  weights / bandwidth).

Baseline: Hugging Face `AutoModelForCausalLM.from_config` with the preset's config, built on the
same GPU in the same dtype, weights drawn N(0, 0.02) on the GPU (not Energon's values: timing does
not depend on them), `generate(max_new_tokens=N, min_new_tokens=N, do_sample=False)`: per-token time
= (time(gen_len new) - time(1 new)) / (gen_len - 1) at batch 1; tokens/s = batch * gen_len /
time(gen_len new) at batch `--batch` (equal-length prompts, so left padding adds no pads).

Where the time goes: the workers are `TimedStagedRunner`s (a bench subclass of the Engine's own
`StagedRunner`), which log when the device began and finished each `sample_step`'s work (CUDA
events, energon/bench/device_clock.py: nothing waits for the device, so timed workers queue steps
as untimed ones do) and so the device's idle gap before the next step; per decode step
`controller period ~= device busy + idle gap` (a gap is the part of the ZeroMQ round trip, the
controller's scheduling, reply handling and the next step message that lookahead did not hide).
`--profile` runs one more decode step of each batch size under torch.profiler for the device
kernel time; `--profile-dir` also writes every rank's chrome trace of those steps (the replying
rank's summary alone cannot show a tp peer that holds the group's collectives back). With
dependent launches the kernels overlap and the summary's kernel times count each kernel's wait
for the one before: `python bench/kernel_path.py TRACE` charges each kernel what the step
waited for it (energon/bench/kernel_path.py).

Warm-up (`--warmup full`, the default): one full-length request and one full batch, for Energon
and HF alike, before anything is timed; on H200 a first 128-token pass ran 2-4x slower in both
while the allocator grew to each new context length.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from energon.actors import Deferred
from energon.bench.device_clock import DeviceClock
from energon.bench.limits import copy_bandwidth, matmul_rate, step_floor, synchronize
from energon.bench.options import (
    add_model_arguments,
    pick_matmul_size,
    resolve_device,
    visible_gpus,
)
from energon.bench.record import (
    Record,
    card_name,
    print_records,
    torch_version,
    write_results,
)
from energon.bench.trace import median_or_none
from energon.engine import Engine
from energon.models.registry import num_layers, resolve
from energon.parallel.attention import Attention
from energon.parallel.topology import NO_MULTICAST_ENV
from energon.request import Request
from energon.runner import pick_dtype
from energon.sampling import SamplingParams
from energon.staged_runner import StagedRunner

SCENARIO = "generate"
TIMED_ACTOR = "energon.bench.generate:TimedStagedRunner"
CHILD_ENV = NO_MULTICAST_ENV  # NVLink multicast off, in every child process too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, tp="1,2")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64, help="concurrent requests (throughput)")
    parser.add_argument(
        "--hf-batch",
        type=int,
        default=0,
        help="HF generate's batch for its throughput, run on the first prompts (0: --batch); "
        "HF's rate at its best batch when --batch does not fit HF's cache",
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed batch-1 requests")
    parser.add_argument("--batch-repeat", type=int, default=2, help="timed batches")
    parser.add_argument("--seed", type=int, default=0, help="weights and prompt token ids")
    parser.add_argument("--hf", default="on", choices=["on", "off"], help="HF generate baseline")
    parser.add_argument("--hf-repeat", type=int, default=2, help="timed HF generate calls each")
    parser.add_argument(
        "--warmup", default="full", choices=["full", "short"], help="untimed run length"
    )
    parser.add_argument("--profile", action="store_true", help="profile one decode step per batch")
    parser.add_argument(
        "--profile-dir",
        default=None,
        help="with --profile: write each rank's chrome trace of each profiled step here",
    )
    parser.add_argument(
        "--graphs",
        default="auto",
        help="comma-separated decode_graphs modes of the workers, each a run (auto, off)",
    )
    parser.add_argument(
        "--lookahead",
        default="on",
        help="comma-separated: on (chained decode steps, the Engine's default), off; each a run",
    )
    parser.add_argument("--copy-mib", type=int, default=0, help="0: 1024 on cuda, 64 on cpu")
    parser.add_argument(
        "--kv-cache",
        choices=("batch", "all"),
        default="batch",
        help="KV cache per worker: batch (1.5x what the whole batch needs, the same at every "
        "tp), all (the Engine's default: all the room a worker has; for a batch whose KV does "
        "not fit, which then runs in waves)",
    )
    parser.add_argument(
        "--time-budget", type=float, default=0, help="seconds; skip a later tp past it (0: none)"
    )
    parser.add_argument("--raw", default=None, help="also write every raw figure to this JSON file")


# ------------------------------------------------------------------------------ worker side


def profile_matches(armed: int | None, prefill: bool, seqs: int, tokens: int) -> bool:
    """Whether a step of `seqs` sequences and `tokens` new tokens is the one armed for a profile
    (`TimedStagedRunner.arm_profile`): with `prefill` one prompt's prefill, else a decode step of
    `armed` sequences or at least 3/4 of them (a pipeline's micro-batches are not all equal)."""
    if armed is None:
        return False
    if prefill:
        return seqs == 1 and tokens > 1
    return tokens == seqs and seqs >= armed * 3 // 4


class TimedStagedRunner(StagedRunner):
    """The Engine's worker actor plus a log of its steps: (start, end, seqs, tokens, context)
    per `sample_step`, in perf_counter seconds of when the device began and finished the step's
    work (context: the KV tokens it attends over, summed over its sequences). The times are
    device marks (energon/bench/device_clock.py): timing never holds the host back, so steps
    queue behind each other as they do in an untimed worker."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.clock: DeviceClock | None = None  # load() picks the device
        # per step: (start, input received, output computed, end) marks and its shape; a later
        # stage first waits for its input, then works (the send downstream is not work)
        self._marks: list[tuple[dict, int, int, int]] = []
        self._log: list[tuple[float, float, int, int, int]] = []
        self._trace: list[tuple[float, float, float]] = []
        # per step: when the host entered sample_step and when it had queued the step
        self._host: list[tuple[float, float]] = []
        self._io: dict = {}
        # profile the next step `profile_matches` picks: a decode step of about this batch, or
        # (True) the next prefill of one prompt
        self._profile_next: int | None = None
        self._profile_prefill = False
        self._profile: dict | None = None
        self._profile_trace: str | None = None  # chrome trace path prefix, or None

    def sample_step(self, step: dict) -> dict | Deferred | None:
        seqs, tokens = len(step["query_lens"]), int(sum(step["query_lens"]))
        context = int(sum(step["context_lens"]))
        if profile_matches(self._profile_next, self._profile_prefill, seqs, tokens):
            self._profile_next = None
            return self._profiled_step(step)
        self.clock = self.clock or DeviceClock(self.device)
        host_in = time.perf_counter()
        self.on_io, self._io = self._mark_io, {"start": self.clock.mark()}
        out = super().sample_step(step)
        self._io["end"] = self.clock.mark()
        self._host.append((host_in, time.perf_counter()))
        self._marks.append((self._io, seqs, tokens, context))
        return out

    def _mark_io(self, kind: str) -> None:
        """The stage's input is here / its output is computed."""
        self._io[kind] = self.clock.mark()

    def _resolve(self) -> None:
        """Turns the marks of every step so far into seconds (waits for the device)."""
        steps, self._marks = self._marks, []
        if not steps:
            return
        order = ("start", "received", "output", "end")
        flat = [
            io.get(k, io["start"] if k == "received" else io["end"])
            for io, *_ in steps
            for k in order
        ]
        times = iter(self.clock.seconds(flat))
        for _, seqs, tokens, context in steps:
            t0, t_in, t_out, t1 = (next(times) for _ in order)
            self._log.append((t0, t1, seqs, tokens, context))
            self._trace.append((t0, t_in, t_out))

    def step_trace(self) -> list[tuple[float, float, float]]:
        """(start, input received, output computed or end) perf_counter seconds of each step
        since the last call."""
        self._resolve()
        trace, self._trace = self._trace, []
        return trace

    def host_trace(self) -> list[tuple[float, float]]:
        """(entered, queued) perf_counter seconds of the host's part of each step since the last
        call: with `step_trace`, whether the device waited for its host."""
        trace, self._host = self._host, []
        return trace

    def step_log(self) -> list[tuple[float, float, int, int, int]]:
        """The steps since the last call (and forget them)."""
        self._resolve()
        log, self._log = self._log, []
        return log

    def bench_facts(self) -> dict:
        """This rank's card, versions, parameter counts and attention path."""
        from energon.parallel import attention

        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        card = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return {
            "rank": self.state.rank,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "card": card or card_name(),
            "torch": torch_version(),
            "matmul_params": sum(
                p.numel()
                for i in self.layer_range
                for p in self.model.layers[i].parameters()
                if p.dim() >= 2
            ),
            "varlen_attn": attention._varlen_attn is not None,
            "varlen_args": sorted(attention._VARLEN_ARGS),
            "flash_paged": {"block_table", "seqused_k"} <= attention._VARLEN_ARGS,
            "use_flash": all(m.use_flash for m in layers),
            "decode_graphs": self.decode_graphs,
            "graph_steps": self.graphs.steps if self.graphs else 0,
            "chained_steps": self.chained_steps,
        }

    def arm_profile(
        self, batch: int | None, prefill: bool = False, trace: str | None = None
    ) -> None:
        """Run the next step of about `batch` sequences that decode (prefill: the next
        one-prompt prefill; `profile_matches`) under torch.profiler; `trace`: also write its
        chrome trace to `{trace}-rank{r}.json`. None disarms."""
        self._profile_next, self._profile, self._profile_prefill = batch, None, prefill
        self._profile_trace = trace

    def profile_result(self) -> dict | None:
        return self._profile

    def _profiled_step(self, step: dict) -> dict | None:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        cuda = self.device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            out = super().sample_step(step)
            synchronize(self.device)
            wall = time.perf_counter() - t0
        if self._profile_trace is not None:
            prof.export_chrome_trace(f"{self._profile_trace}-rank{self.state.rank}.json")
        events = prof.key_averages()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        # kernels only: an op's self device time repeats the kernels it launched
        kernel_us = (
            sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
            if cuda
            else None
        )
        self._profile = {
            "batch": len(step["query_lens"]),
            "wall_s": wall,
            "device_kernel_s": kernel_us / 1e6 if kernel_us is not None else None,
            "top": [
                {"op": e.key, "us": getattr(e, key), "calls": e.count}
                for e in sorted(events, key=lambda e: -getattr(e, key))[:12]
            ],
            # where the host's time goes (launch-bound steps: eager prefill)
            "top_host": [
                {"op": e.key, "us": e.self_cpu_time_total, "calls": e.count}
                for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
            ],
        }
        return out


class TimedEngine(Engine):
    """An Engine whose local workers are TimedStagedRunner: the bench's timing, not the
    engine's. `timed` is False when its workers come from another launcher."""

    worker_actor = TIMED_ACTOR

    def __init__(self, *args, **kwargs):
        # The generate and pipeline benches run the same prompts again and again (a warm-up,
        # then each timed run); with prefix caching every run after the first would skip its
        # prefill. They measure the prompts computed, as their baseline (HF generate) does.
        kwargs.setdefault("prefix_caching", False)
        super().__init__(*args, **kwargs)
        # perf_counter seconds (one clock for every process of the host) of each step, by id:
        # [the kick that sent it began, sent, reply applied from, applied until]
        self.step_times: dict[int, list[float]] = {}
        self.last_request = None  # the Request of the latest infer: its own timing marks

    @property
    def timed(self) -> bool:
        return self.launcher == "local"

    def controller_trace(self, kicks: bool = False) -> list[list[float]]:
        """[sent, reply in, reply applied] of each step since the last call, in step order
        (the order every worker ran them), and forget them; `kicks`: each row led by when the
        `_kick` that sent the step began (it plans, builds and sends its steps)."""
        times, self.step_times = self.step_times, {}
        rows = (times[k] for k in sorted(times) if len(times[k]) == 4)
        return [row if kicks else row[1:] for row in rows]

    def _submit(self, *args, **kwargs):
        self.last_request = super()._submit(*args, **kwargs)
        return self.last_request

    def _kick(self) -> None:
        begin = time.perf_counter()
        super()._kick()
        if self.scheduler is not None:
            now = time.perf_counter()
            for plan in self.scheduler.in_flight:
                self.step_times.setdefault(plan.step_id, [begin, now])

    def _apply_step(self, plan, reply: dict) -> None:
        start = time.perf_counter()
        super()._apply_step(plan, reply)
        self.step_times.setdefault(plan.step_id, [start, start])
        self.step_times[plan.step_id].extend((start, time.perf_counter()))


# ------------------------------------------------------------------------------ controller side


def make_prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` seeded prompts of `length` token ids in [4, vocab)."""
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(length)] for _ in range(count)]


def kv_bytes_per_token(config: dict, dtype: torch.dtype) -> int | None:
    """K and V bytes one token adds to the cache of the whole model (tp=1), from an HF config."""
    layers = num_layers(config)
    heads = config.get("num_attention_heads") or config.get("n_head")
    hidden = config.get("hidden_size") or config.get("n_embd")
    if not (layers and heads and hidden):
        return None
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    return layers * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def measure_limits(device: str, gpus: int, matmul_size: int, copy_bytes: int, dtype) -> list[dict]:
    """Each card's matmul rate (FLOP/s) and copy bandwidth (bytes/s), in this process."""
    devices = [torch.device("cuda", i) for i in range(gpus)] if device == "cuda" else ["cpu"]
    out = []
    for dev in map(torch.device, devices):
        out.append(
            {
                "device": str(dev),
                "matmul_flops": matmul_rate(dev, dtype, matmul_size),
                "copy_bytes_per_s": copy_bandwidth(dev, copy_bytes),
            }
        )
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return out


def summarize_log(log: list, batch: int) -> dict:
    """Decode steps of `batch` sequences: worker busy time, the idle gap before the next one and
    the period from one step's end to the next (medians, plus means and p90 where slow
    outliers matter)."""
    decode = [(t0, t1) for t0, t1, seqs, tokens, _ in log if seqs == tokens == batch]
    pairs = list(zip(decode, decode[1:], strict=False))
    # starts are device marks: a step queued behind the last starts when that one ends
    busy = [t1 - t0 for t0, t1 in decode[:1]] + [b[1] - max(b[0], a[1]) for a, b in pairs]
    gaps = [max(0.0, b[0] - a[1]) for a, b in pairs]
    periods = [b[1] - a[1] for a, b in pairs]
    return {
        "steps": len(log),
        "decode_steps": len(decode),
        "busy_s": median_or_none(busy),
        "gap_s": median_or_none(gaps),
        "period_s": median_or_none(periods),
        "busy_mean_s": statistics.fmean(busy) if busy else None,
        "period_mean_s": statistics.fmean(periods) if periods else None,
        "period_p90_s": sorted(periods)[int(0.9 * (len(periods) - 1))] if periods else None,
        "prefill_busy_s": sum(t1 - t0 for t0, t1, seqs, tokens, _ in log if tokens > seqs),
        # every step as [new tokens, KV tokens attended]: the executed-steps roofline
        "executed": [[tokens, context] for _, _, _, tokens, context in log],
    }


def first_token_split(
    request: Request | None,
    controller: list | None,
    steps: list | None,
    hosts: list | None,
) -> dict | None:
    """Where a lone request's first token went, in seconds, from its prompt's step (the first
    one the controller sent after it arrived): the `request`'s arrived and first-token marks, the
    controller's [kick began, sent, reply in, applied], the replying worker's host (entered,
    queued) and device (start, input received, output computed) marks, one perf_counter clock.

    schedule: arrived -> the `_kick` that sent the step beginning (the loop's next turn)
    deliver:  kick began -> the worker entering the step (planning, the step message, ZeroMQ,
              decoding it; with lookahead the kick sends the next step right after)
    step:     entered -> its output computed on the device (the host queueing it, the device)
    reply:    output computed -> the reply in the controller's hands (sampling, the copy back,
              ZeroMQ)
    apply:    reply in -> the first token handed to the request
    None when the traces do not hold the step (an untimed launcher)."""
    if request is None or request.first_token is None or not (controller and steps and hosts):
        return None
    (kicked, _, reply_in, _), (_, _, output), (entered, _) = controller[0], steps[0], hosts[0]
    arrived, first = request.arrived, request.first_token
    return {
        "schedule_s": kicked - arrived,
        "deliver_s": entered - kicked,
        "step_s": output - entered,
        "reply_s": reply_in - output,
        "apply_s": first - reply_in,
    }


async def measure_engine(
    args,
    tp: int,
    device: str,
    dtype: str,
    prompts,
    kv_memory,
    graphs: str = "auto",
    lookahead: bool = True,
) -> dict:
    """One Engine: batch-1 latency, batched throughput, worker step logs (and profiles)."""
    greedy = dict(temperature=0.0, ignore_eos=True)
    params = SamplingParams(max_tokens=args.gen_len, **greedy)
    short = SamplingParams(max_tokens=min(4, args.gen_len), **greedy)
    engine = TimedEngine(
        args.model,
        tp=tp,
        device=device,
        dtype=dtype,
        seed=args.seed,
        kv_cache_memory=kv_memory,
        max_num_seqs=max(256, args.batch),
        max_batch_tokens=max(8192, args.batch * args.prompt_len),
        progress=False,
        lookahead=lookahead,
    )
    engine.decode_graphs = graphs  # also "static" (cpu tests), which Engine's argument refuses
    t0 = time.perf_counter()
    async with engine:
        start_s = time.perf_counter() - t0
        group = engine.group
        rank = (engine.pp - 1) * engine.tp  # the rank that answers steps
        facts = await group.broadcast("bench_facts") if engine.timed else None
        memory = await group.broadcast("memory")
        # warm-up: both batch shapes at full length, so kernels exist and the allocator holds
        # blocks of every size the timed runs need (a first 128-token pass ran 2-4x slower
        # on H200, in HF alike, while the allocator grew to each new context length)
        warm = params if args.warmup == "full" else short
        await engine.infer(prompts[0], warm)
        await asyncio.gather(*(engine.infer(p, warm) for p in prompts))

        async def logs():
            return (await group.broadcast("step_log"))[rank] if engine.timed else []

        async def traces():
            if not engine.timed:
                return None, None, None
            controller = engine.controller_trace(kicks=True)
            steps = (await group.broadcast("step_trace"))[rank]
            hosts = (await group.broadcast("host_trace"))[rank]
            return controller, steps, hosts

        await logs()
        await traces()
        single = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            done = await engine.infer(prompts[0], params)
            wall = time.perf_counter() - t
            worker = summarize_log(await logs(), 1)
            controller, steps, hosts = await traces()
            single.append(
                {
                    "per_token_s": done.timings.per_output_token_s,
                    "first_token_s": done.timings.first_token_s,
                    "wall_s": wall,
                    "tokens": len(done.token_ids),
                    "token_ids_head": done.token_ids[:8],
                    "worker": worker,
                    "first_token_split": first_token_split(
                        engine.last_request, controller, steps, hosts
                    ),
                }
            )
        batched = []
        for _ in range(args.batch_repeat):
            t = time.perf_counter()
            dones = await asyncio.gather(*(engine.infer(p, params) for p in prompts))
            wall = time.perf_counter() - t
            batched.append(
                {
                    "wall_s": wall,
                    "tokens": sum(len(d.token_ids) for d in dones),
                    "per_token_s": statistics.median(d.timings.per_output_token_s for d in dones),
                    "first_token_s": statistics.median(d.timings.first_token_s for d in dones),
                    "worker": summarize_log(await logs(), len(prompts)),
                }
            )
        profiles = {}
        if args.profile and engine.timed:
            base = None
            if args.profile_dir:
                os.makedirs(args.profile_dir, exist_ok=True)
                base = os.path.join(args.profile_dir, f"tp{tp}-{graphs}-lookahead{lookahead}")
            for n in (1, len(prompts)):
                await group.broadcast("arm_profile", n, False, base and f"{base}-decode{n}")
                await asyncio.gather(*(engine.infer(p, short) for p in prompts[:n]))
                profiles[n] = (await group.broadcast("profile_result"))[rank]
            await group.broadcast("arm_profile", 1, True, base and f"{base}-prefill")
            await engine.infer(prompts[0], short)
            profiles["prefill"] = (await group.broadcast("profile_result"))[rank]
        after = (await group.broadcast("bench_facts"))[rank] if engine.timed else None
        stats = {
            "num_blocks": engine.scheduler.blocks.num_blocks,
            "block_size": engine.block_size,
        }
    return {
        "tp": tp,
        "graphs": graphs,
        "lookahead": lookahead,
        "start_s": start_s,
        "facts": facts,
        "facts_after": after,
        "memory": memory,
        "cache": stats,
        "single": single,
        "batched": batched,
        "profiles": profiles,
    }


def hf_model(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """The HF model of the preset's config on `device` in `dtype`, weights ~ N(0, 0.02) (biases
    0, norms 1), drawn there."""
    import transformers

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
    hf_config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device(device):
        net = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    net.eval()
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, 0.0, 0.02, generator=g)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return net


def hf_batch(args) -> int:
    """The batch HF generate's throughput is measured at."""
    return min(args.hf_batch or args.batch, args.batch)


def measure_hf(args, config: dict, device: torch.device, dtype: torch.dtype, prompts) -> dict:
    """HF generate: seconds for 1 and gen_len new tokens at batch 1 and at batch len(prompts),
    after an untimed generate of gen_len tokens at each batch. The model is freed (and the allocator's cache emptied) before returning."""
    import transformers

    pad = config.get("pad_token_id") or 0
    out = {"transformers": transformers.__version__}
    t0 = time.perf_counter()
    net = hf_model(config, device, dtype, args.seed)
    synchronize(device)
    out["build_s"] = time.perf_counter() - t0

    def run(net, batch: list[list[int]], new: int) -> float:
        ids = torch.tensor(batch, device=device)
        mask = torch.ones_like(ids)
        synchronize(device)
        t = time.perf_counter()
        with torch.inference_mode():
            res = net.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
        synchronize(device)
        assert res.shape[1] == ids.shape[1] + new, res.shape
        return time.perf_counter() - t

    try:
        for batch in ([prompts[0]], prompts[: hf_batch(args)]):
            # Always a full-length warm-up: the baseline is timed at its best (a first
            # 128-token generate on H200 took 3.6x longer than the next at batch 1).
            run(net, batch, args.gen_len)
            one = [run(net, batch, 1) for _ in range(args.hf_repeat)]
            full = [run(net, batch, args.gen_len) for _ in range(args.hf_repeat)]
            out[len(batch)] = {"one_s": one, "full_s": full}
    finally:
        del net
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def variants(args) -> list[tuple[str, bool]]:
    """(decode_graphs, lookahead) of each run per tp: the defaults, then each ablation asked
    for alone (one setting off the default at a time)."""
    graphs = [m.strip() for m in args.graphs.split(",") if m.strip()]
    lookahead = {m.strip() for m in args.lookahead.split(",") if m.strip()}
    if not lookahead <= {"on", "off"}:
        raise SystemExit(f"--lookahead takes on and/or off (got {args.lookahead!r})")
    out = [("auto", True)] if "auto" in graphs and "on" in lookahead else []
    out += [(g, True) for g in graphs if g != "auto"]
    out += [("auto", False)] if "off" in lookahead else []
    return out


def variant_suffix(graphs: str, lookahead: bool) -> str:
    """The metric suffix of an ablation run ("" for the defaults: graphs auto, lookahead on)."""
    return ("" if graphs == "auto" else f"_graphs_{graphs}") + (
        "" if lookahead else "_lookahead_off"
    )


def build_records(args, run: dict, hf: dict | None, limits: list[dict]) -> list[Record]:
    """Decode latency (batch 1), throughput (batch B), first-token time and the card's limits."""
    tp, B, L, G = run["tp"], args.batch, args.prompt_len, args.gen_len
    suffix = variant_suffix(run.get("graphs", "auto"), run.get("lookahead", True))
    used = limits[:tp] if limits[0]["device"].startswith("cuda") else limits
    bandwidth = min(x["copy_bytes_per_s"] for x in used)
    rate = min(x["matmul_flops"] for x in used)
    facts = (run["facts"] or [{}])[0]
    weights = max(m["param_bytes"] for m in run["memory"])
    kv_bytes = max(m["kv_cache_bytes"] for m in run["memory"])
    kv_tok = kv_bytes / (run["cache"]["num_blocks"] * run["cache"]["block_size"])
    mparams = max(f["matmul_params"] for f in run["facts"]) if run["facts"] else weights / 2

    def floor(tokens: float, attended: float) -> float:
        return step_floor(tokens, attended, mparams, weights, kv_tok, rate, bandwidth)

    # batch 1: mean decode context L + G/2 (contexts L+1 .. L+G-1)
    decode_floor = floor(1, L + G / 2)
    prefill_floor = floor(L, 0)
    per_tok = [s["per_token_s"] for s in run["single"]]
    first = [s["first_token_s"] for s in run["single"]]
    per_tok_s, first_s = statistics.median(per_tok), statistics.median(first)
    # the prompt's step on the replying worker, device marks from its start to its end: what
    # of the first token the device took (the rest: the controller, the wire, the host)
    prefill_steps = [s["worker"].get("prefill_busy_s") for s in run["single"] if s.get("worker")]
    prefill_note = (
        f"; its prefill step on the device (worker marks, median): "
        f"{statistics.median(prefill_steps) * 1e3:.2f} ms"
        if prefill_steps and all(prefill_steps)
        else ""
    )
    splits = [s["first_token_split"] for s in run["single"] if s.get("first_token_split")]
    if splits and len(splits) == len(run["single"]):
        prefill_note += "; split (medians, ms): " + ", ".join(
            f"{part.removesuffix('_s')} {statistics.median(x[part] for x in splits) * 1e3:.2f}"
            for part in splits[0]
        )
    # batch B: one prefill of B*L tokens, then G-1 decode steps of B sequences
    floor_total = floor(B * L, 0) + sum(floor(B, B * (L + k)) for k in range(1, G))
    ceiling = B * G / floor_total
    # the issue's step-wise roofline: over the steps the Engine executed (several waves when the
    # KV cache holds fewer than B sequences), max(matmul FLOPs / rate, bytes read / bandwidth)
    executed = [
        sum(floor(tokens, context) for tokens, context in b["worker"].get("executed", []))
        for b in run["batched"]
    ]
    ceiling_all_at_once = ceiling
    if run["batched"] and all(executed):
        ceiling = B * G / statistics.median(executed)
    rates = [b["tokens"] / b["wall_s"] for b in run["batched"]]
    rate_tok = statistics.median(rates)
    burst_first = [b["first_token_s"] for b in run["batched"] if "first_token_s" in b]
    burst_note = (
        f"; first token of the {B} requests submitted at once (the median request of each "
        f"batch): {', '.join(f'{x * 1e3:.1f}' for x in burst_first)} ms"
        if burst_first
        else ""
    )

    hf1 = hf.get(1) if hf else None
    HB = hf_batch(args)
    hfb = hf.get(HB) if hf else None
    hf_tok = hf_first = hf_rate = None
    if hf1:
        hf_first = statistics.median(hf1["one_s"])
        hf_tok = (statistics.median(hf1["full_s"]) - hf_first) / (G - 1)
    if hfb:
        hf_rate = HB * G / statistics.median(hfb["full_s"])
    hf_name = f"HF transformers {hf['transformers']} generate, 1 GPU" if hf else None

    on_cuda = str(facts.get("device", "")).startswith("cuda")
    common = dict(
        scenario=SCENARIO,
        model=args.model,
        dtype=facts.get("dtype"),
        tp=tp,
        pp=1,
        prompt_len=L,
        gen_len=G,
        card=facts.get("card", card_name()),
        n_gpus=tp if on_cuda else 0,
        torch=facts.get("torch", torch_version()),
    )

    def worker_split(entries: list[dict]) -> str:
        w = [e["worker"] for e in entries if e["worker"]["busy_s"] is not None]
        if not w:
            return "worker timing unavailable"
        busy = statistics.median(x["busy_s"] for x in w)
        gaps = [x["gap_s"] for x in w if x["gap_s"] is not None]
        gap = statistics.median(gaps) if gaps else float("nan")
        return (
            f"worker-side per decode step (replying rank, median): sample_step {busy * 1e3:.2f} ms "
            f"busy (from its start, or the previous step's end if queued behind it, to its "
            f"device work's end), {gap * 1e3:.2f} ms idle before the next step arrives "
            f"(ZeroMQ round trip + controller reply handling, scheduling, step message)"
        )

    after = run["facts_after"] or {}
    graph_note = (
        f"decode graphs {after.get('decode_graphs')} ({after.get('graph_steps')} decode steps "
        f"replayed on the replying rank, run {run.get('graphs', 'auto')!r}); lookahead "
        f"{'on' if run.get('lookahead', True) else 'off'} ({after.get('chained_steps')} "
        f"chained steps)"
    )
    attn = (
        f"attention: flash varlen {'paged' if facts.get('flash_paged') else 'unpaged only'}"
        f" (varlen_attn args {facts.get('varlen_args')}), use_flash after run "
        f"{after.get('use_flash')}"
        if facts
        else ""
    )
    hf_note = "no HF baseline"
    if hf1:
        hf_note = f"HF: time(1 new) {hf1['one_s']}, time({G} new) {hf1['full_s']} s at batch 1" + (
            f"; batch {HB}: time({G} new) {hfb['full_s']} s" if hfb else ""
        )
    records = [
        Record(
            metric="decode_latency_b1" + suffix,
            unit="ms/token",
            value=per_tok_s * 1e3,
            batch=1,
            baseline_name=hf_name and hf_name + f" (t({G}) - t(1)) / {G - 1}",
            baseline_value=hf_tok and hf_tok * 1e3,
            ratio=hf_tok / per_tok_s if hf_tok else None,
            limit_value=decode_floor * 1e3,
            of_limit=decode_floor / per_tok_s,
            notes=f"Engine.infer of one {L}-token prompt, {G} new tokens greedy, ignore_eos; "
            f"Completion.timings.per_output_token_s, median of {len(per_tok)} "
            f"({', '.join(f'{x * 1e3:.2f}' for x in per_tok)} ms); floor = ({weights / 1e9:.3f} GB "
            f"weights per GPU + {kv_tok / 1e3:.1f} kB KV per token per GPU x {L + G / 2:.0f} "
            f"mean context) / {bandwidth / 1e9:.0f} GB/s copy bandwidth; "
            f"{worker_split(run['single'])}; {graph_note}; {attn}; {hf_note}; "
            f"engine start {run['start_s']:.1f} s",
            **common,
        ),
        Record(
            metric="throughput" + suffix,
            unit="tokens/s",
            value=rate_tok,
            batch=B,
            baseline_name=hf_name and hf_name + f", batch {HB}",
            baseline_value=hf_rate,
            ratio=rate_tok / hf_rate if hf_rate else None,
            limit_value=ceiling,
            of_limit=rate_tok / ceiling,
            notes=f"{B} concurrent Engine.infer ({L}-token prompts, {G} new tokens greedy, "
            f"ignore_eos) via asyncio.gather; output tokens / wall time from submission to the "
            f"last completion, prefill included, median of {len(rates)} "
            f"({', '.join(f'{x:.0f}' for x in rates)} tokens/s); ceiling = {B * G} tokens / "
            f"the step-wise roofline of the steps executed: sum of max(2 * {mparams} params * "
            f"new tokens / matmul rate, (weights + KV tokens attended x KV per token) / "
            f"bandwidth), median {B * G / ceiling * 1e3:.1f} ms (if all {B} ran as one batch: "
            f"{floor_total * 1e3:.1f} ms, {ceiling_all_at_once:.0f} tokens/s); per-request "
            f"median ms/token "
            f"{statistics.median(b['per_token_s'] for b in run['batched']) * 1e3:.2f}; "
            f"{worker_split(run['batched'])}; {graph_note}{burst_note}",
            **common,
        ),
        Record(
            metric="first_token_latency_b1" + suffix,
            unit="ms",
            value=first_s * 1e3,
            batch=1,
            baseline_name=hf_name and hf_name + " time(1 new token)",
            baseline_value=hf_first and hf_first * 1e3,
            ratio=hf_first / first_s if hf_first else None,
            limit_value=prefill_floor * 1e3,
            of_limit=prefill_floor / first_s,
            notes=f"Completion.timings.first_token_s of the batch-1 requests ({L}-token prompt), "
            f"median; floor = max(2 * {mparams} matmul params * {L} / matmul rate, weights / "
            f"bandwidth){prefill_note}",
            **common,
        ),
        Record(
            metric="matmul_rate",
            unit="TFLOP/s",
            value=rate / 1e12,
            notes=f"slowest of {len(used)} card(s), {args.matmul_size or 'default'} square, "
            "measured by the bench process",
            **common,
        ),
        Record(
            metric="copy_bandwidth",
            unit="GB/s",
            value=bandwidth / 1e9,
            notes="device-to-device, bytes read + written; slowest card",
            **common,
        ),
    ]
    return records


def _run_async(coro):
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if getattr(uvloop, "run", None) is None:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main(args: argparse.Namespace) -> int:
    os.environ.update(CHILD_ENV)
    t_start = time.perf_counter()
    gpus = visible_gpus()
    device = resolve_device(args.device, gpus)
    spec = resolve(args.model)
    config = spec.config
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    dtype = pick_dtype(args.dtype, config, dev)
    dtype_name = str(dtype).removeprefix("torch.")
    prompts = make_prompts(config["vocab_size"], args.batch, args.prompt_len, args.seed)
    tps = [int(t) for t in args.tp.split(",")]
    if device == "cuda":
        skipped = [t for t in tps if t > gpus]
        tps = [t for t in tps if t <= gpus]
        for t in skipped:
            print(f"skip tp={t}: {gpus} GPU(s) visible", flush=True)
    per_tok = kv_bytes_per_token(config, dtype)
    blocks = args.batch * -(-(args.prompt_len + args.gen_len) // 16)
    batch_kv = args.kv_cache == "batch" and per_tok
    kv_memory = int(1.5 * per_tok * 16 * blocks) + (64 << 20) if batch_kv else None
    print(
        f"energon bench generate: {args.model} ({dtype_name}) on {device} ({gpus} GPU(s)), "
        f"prompt {args.prompt_len}, {args.gen_len} new tokens, batch 1 and {args.batch}, "
        f"tp {tps}, KV cache "
        + (f"{kv_memory / 2**30:.2f} GiB" if kv_memory else "all the room each worker has"),
        flush=True,
    )
    size = pick_matmul_size(args, device)
    copy_bytes = (args.copy_mib or (1024 if device == "cuda" else 64)) << 20
    limits = measure_limits(device, max(tps, default=1), size, copy_bytes, dtype)
    print(f"limits: {limits}", flush=True)

    raw: dict = {"limits": limits, "runs": [], "hf": None, "args": vars(args)}
    out_dir = Path(args.out) if args.out else None
    records: list[Record] = []

    def save() -> Path:
        if args.raw:
            Path(args.raw).parent.mkdir(parents=True, exist_ok=True)
            Path(args.raw).write_text(json.dumps(raw, indent=1, default=str) + "\n")
        return write_results(SCENARIO, records, out_dir)

    hf = None
    runs = [(t, g, la) for t in tps for g, la in variants(args)]
    for i, (tp, graphs, lookahead) in enumerate(runs):
        name = f"tp={tp} graphs={graphs} lookahead={'on' if lookahead else 'off'}"
        elapsed = time.perf_counter() - t_start
        if i and args.time_budget and elapsed > args.time_budget:
            print(f"skip {name}: {elapsed:.0f} s elapsed, over --time-budget")
            continue
        print(f"{name}: starting the Engine at {elapsed:.0f} s", flush=True)
        try:
            run = _run_async(
                measure_engine(args, tp, device, dtype_name, prompts, kv_memory, graphs, lookahead)
            )
        except Exception as exc:  # noqa: BLE001 - keep what earlier tp sizes measured
            print(f"{name} failed: {exc!r}", flush=True)
            raw["runs"].append(
                {"tp": tp, "graphs": graphs, "lookahead": lookahead, "error": repr(exc)}
            )
            if records:
                save()
            continue
        raw["runs"].append(run)
        print(
            f"tp={tp}: done at {time.perf_counter() - t_start:.0f} s: "
            f"{json.dumps(run, default=str)[:2500]}",
            flush=True,
        )
        if hf is None and args.hf == "on":  # after the Engine let go of the card
            try:
                hf = measure_hf(args, config, dev, dtype, prompts)
            except Exception as exc:  # noqa: BLE001 - the Engine's figures still count
                print(f"HF baseline failed: {exc!r}", flush=True)
                hf = {"error": repr(exc), "transformers": "?"}
            raw["hf"] = hf
            print(f"hf: {hf}", flush=True)
        hf_ok = hf if hf and "error" not in hf else None
        new = build_records(args, run, hf_ok, limits)
        suffix = variant_suffix(graphs, lookahead)
        if suffix:  # an ablation adds its own three figures, not the card's again
            new = [r for r in new if r.metric.endswith(suffix)]
        names = {(r.tp, r.metric) for r in new}
        records = [r for r in records if (r.tp, r.metric) not in names] + new
        save()
    if not records:
        print("nothing measured", file=sys.stderr)
        return 1
    print_records(records, "tp")
    for r in records:
        if r.metric.startswith(("decode_latency_b1", "throughput")):
            print(f"tp={r.tp} {r.metric}: {r.notes}")
    path = save()
    print(f"wrote {path} ({time.perf_counter() - t_start:.0f} s)")
    return 0
