"""`energon bench sampler`: one sampling step on the last stage, Energon's Sampler against the
logits processors of Hugging Face `generate`.

Each case is a batch of `--rows` rows of seeded random fp16 logits over opt-13b's vocabulary
(50,272) sampled with one set of SamplingParams for every row. Energon: `Sampler.sample` as the
worker calls it (a row with a penalty or a bias first started from a 64-token history and a
512-token prompt, then its tokens appended each call; the step's features given, as the
controller sends them). Baseline: what `generate` runs per step for the same params: its processors (RepetitionPenalty, SequenceBias, Temperature, TopK, TopP, MinP) on
float32 logits with the prompt and history as input_ids, then argmax or softmax + multinomial;
HF has no presence or frequency penalty, so those cases' baseline runs without it (the notes say
so). Per call = (time for `--calls` calls in a row, host issue included, until the stream is
done) / calls, median of `--repeat`: the host issue of the many small ops is what a step pays
here. Floor = bytes the step must read at least (the logits) / copy bandwidth of the same run: the ops' launches, not bytes, set the time, so the
fraction is small; it shows how far from the memory a step's sampling is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from dataclasses import replace

import torch

from energon.bench.limits import copy_bandwidth, synchronize
from energon.bench.record import Record, copy_bandwidth_record, print_records, write_results
from energon.penalties import ENV_SWITCH as PENALTIES_SWITCH
from energon.sampler import Sampler
from energon.sampling import SamplingParams, step_features

SCENARIO = "sampler"
EAGER_SUFFIX = "_eager_ops"
SWITCHES = (PENALTIES_SWITCH,)
VOCAB = 50272  # opt-13b
HISTORY, PROMPT = 64, 512
CASES = {
    "greedy": dict(temperature=0.0),
    "top_p": dict(temperature=0.8, top_p=0.9),
    "top_k_top_p": dict(temperature=0.8, top_k=50, top_p=0.9),
    "top_p_min_p": dict(temperature=0.8, top_p=0.9, min_p=0.05),
    "greedy_repetition": dict(temperature=0.0, repetition_penalty=1.2),
    "greedy_frequency_presence": dict(temperature=0.0, frequency_penalty=0.5, presence_penalty=0.5),
    "greedy_logit_bias": dict(temperature=0.0, logit_bias={t: -5.0 for t in range(10, 110, 10)}),
    "top_p_repetition": dict(temperature=0.8, top_p=0.9, repetition_penalty=1.2),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default="1,64,256", help="comma-separated batch rows")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--calls", type=int, default=100, help="calls timed in a row")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument(
        "--kernels",
        default="on,off",
        help="on: the Triton kernels where they run (penalties); off: the eager ops "
        f"(ENERGON_TRITON_PENALTIES=0), records suffixed {EAGER_SUFFIX!r}; each case's "
        "timed runs alternate between the settings",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")


def hf_step(params: SamplingParams, input_ids: torch.Tensor, generator: torch.Generator):
    """What Hugging Face `generate` does to a step's logits for `params`: a function of the
    float16 logits that returns token ids."""
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.logit_bias:
        processors.append(SequenceBiasLogitsProcessor([[[t], b] for t, b in params.logit_bias]))
    if not params.greedy:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.min_p:
            processors.append(MinPLogitsWarper(params.min_p))

    def step(logits: torch.Tensor) -> torch.Tensor:
        scores = processors(input_ids, logits.float())
        if params.greedy:
            return scores.argmax(dim=-1)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return step


@contextlib.contextmanager
def kernels(on: bool):
    """The Sampler's Triton kernels on (as configured) or off (its eager ops) inside."""
    saved = {name: os.environ.get(name) for name in SWITCHES}
    if not on:
        os.environ.update({name: "0" for name in SWITCHES})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def case_records(args, name: str, rows: int, bandwidth: float, device) -> list[Record]:
    """One record per --kernels setting of a case, against one measurement of the baseline."""
    params = SamplingParams(max_tokens=HISTORY + 1, **CASES[name])
    settings = [s.strip() for s in args.kernels.split(",")]
    calls = {}
    for setting in settings:
        with kernels(setting != "off"):
            calls[setting] = sampler_call(args, params, rows, device)
    ours = alternated_seconds(calls, device, args.calls, args.repeat)
    logits = case_logits(args, rows, device)
    prompt, history = token_ids(args, rows)
    input_ids = torch.cat([prompt, history], dim=1).to(device)
    baseline_params = params
    note = ""
    if params.presence_penalty or params.frequency_penalty:
        baseline_params = replace(params, presence_penalty=0.0, frequency_penalty=0.0)
        note = "; HF has no presence/frequency penalty: its baseline runs without them"
    hf = hf_step(baseline_params, input_ids, torch.Generator(device=device).manual_seed(0))
    theirs = alternated_seconds({"hf": lambda: hf(logits)}, device, args.calls, args.repeat)["hf"]
    moved = rows * args.vocab * 2  # the fp16 logits, read once
    floor = moved / bandwidth
    return [
        Record(
            scenario=SCENARIO,
            metric=f"{name}_us" + ("" if setting == "on" else EAGER_SUFFIX),
            unit="us",
            value=ours[setting] * 1e6,
            model="opt-13b vocabulary",
            dtype="float16",
            batch=rows,
            baseline_name="transformers logits processors + argmax / multinomial",
            baseline_value=theirs * 1e6,
            ratio=theirs / ours[setting],
            limit_value=floor * 1e6,
            of_limit=floor / ours[setting],
            n_gpus=1 if device.type == "cuda" else 0,
            notes=f"{CASES[name]} on {rows} rows of {args.vocab} fp16 logits; "
            + ("Triton kernels where they run" if setting == "on" else "eager torch ops only")
            + f"; per call = median of {args.repeat} runs of {args.calls} calls, host issue "
            f"included; floor = {moved / 1e6:.1f} MB / {bandwidth / 1e9:.0f} GB/s{note}",
        )
        for setting in settings
    ]


def case_logits(args, rows: int, device) -> torch.Tensor:
    """The case's seeded fp16 logits."""
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(rows, args.vocab, device=device, dtype=torch.float16, generator=g) * 3


def token_ids(args, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's seeded prompt and history."""
    cpu = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (rows, PROMPT), generator=cpu)
    history = torch.randint(0, args.vocab, (rows, HISTORY), generator=cpu)
    return prompt, history


def alternated_seconds(calls: dict, device, n: int, repeat: int) -> dict:
    """Per call of each setting's function (setting -> fn; "off" runs without the kernels):
    after 3 warm-up calls each, the median over `repeat` rounds in which each setting runs `n`
    calls in a row until the device is done, in turn (so a drift of the machine meets all of
    them)."""
    times = {setting: [] for setting in calls}
    for setting, fn in calls.items():
        with kernels(setting != "off"):
            for _ in range(3):
                fn()
    for _ in range(repeat):
        for setting, fn in calls.items():
            with kernels(setting != "off"):
                synchronize(device)
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                synchronize(device)
                times[setting].append((time.perf_counter() - start) / n)
    return {setting: statistics.median(t) for setting, t in times.items()}


def sampler_call(args, params: SamplingParams, rows: int, device):
    """A function that runs Sampler.sample on the case's rows once (as the worker calls it,
    each row's first step done)."""
    logits = case_logits(args, rows, device)
    prompt, history = token_ids(args, rows)
    wire = params.to_wire()
    # as the controller's Request and step.py send them: a bias only with the history
    start = {name: wire.pop(name) for name in ("bias_ids", "bias_values") if name in wire}
    sampler = Sampler(device, seed=0)
    row_params = [dict(wire) for _ in range(rows)]
    if params.penalised or start:
        for i, row in enumerate(row_params):
            row["seq"] = i
        first = [
            {**row, **start, "history": history[i].tolist(), "prompt": prompt[i].tolist()}
            for i, row in enumerate(row_params)
        ]
        sampler.sample(logits, first, [HISTORY] * rows)
    steps = [HISTORY] * rows
    features = step_features(row_params)  # what the controller sends with each step
    return lambda: sampler.sample(logits, row_params, steps, features)


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("energon bench sampler: no CUDA here (--device cpu runs it on the host)")
        return 1
    bandwidth = copy_bandwidth(device, 256 << 20)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)", flush=True)
    records = []
    for rows in (int(r) for r in args.rows.split(",")):
        for name in args.cases.split(","):
            new = case_records(args, name, rows, bandwidth, device)
            records += new
            print_records(new, lead="batch")
    records.append(copy_bandwidth_record(SCENARIO, bandwidth, n_gpus=records[0].n_gpus))
    path = write_results(SCENARIO, records, args.out)
    print(f"\nwrote {path}")
    return 0
