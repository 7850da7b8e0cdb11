"""Simulate the pipeline bench's workload through the real Scheduler with a roofline cost model.

A dev tool, not a measurement: it runs `energon.scheduler.Scheduler` as the Engine drives it
(up to `in_flight` plans out, each completed when its last stage finishes plus the controller's
turnaround, then scheduled again), and times each stage's step as max(FLOPs / effective matmul
rate, bytes / effective bandwidth) + a fixed per-step cost. The defaults are opt-13b on H100s,
calibrated on the 2x H100 run of 2026-11-26 (bench/results/...-pipeline.json, code b75b45a): a
16,384-token prefill step at 0.82 of the measured matmul rate, batch-1 decode at 0.84 of the copy
bandwidth, and 10 ms from a step's end on the last stage to the next step on the first (the
controller's turnaround under this load: with it the model gives 2,069 / 2,842 / 3,005 / 2,765
tokens/s at pp=1 and pp=2 with 2, 3, 4 in flight, against 1,931 / 2,591 / 2,921 / 2,622
measured; with 3 ms it would rank 2 in flight first).

    python bench/simulate_pipeline.py --pp 1,2,4 --in-flight 0,1,2

prints tokens/s and stage utilisation per layout; `--lookahead` chains each micro-batch's next
step at pp > 1 as the Engine does by default since ed3363d; `--card h200` takes an H200's rates and
KV room; `--head spread` has every stage read a pp-th of the LM head instead of the last stage all
of it (a what-if); `--balanced` splits the step token budget
evenly over the micro-batches in flight (so that a prefill chunk does not make one micro-batch's
step many times longer than the others'); `--turnaround` sets the controller's turnaround.

The pipeline bench now measures the turnaround's parts (energon.bench.trace.turnaround): on 4x
H200 at code 059eca1, ~2.2 ms at pp=4 with 5 in flight (reply 0.46 ms, controller 1.7 ms, the
first stage starting at once), after a worker fix that took the reply from 12 ms; pass
`--turnaround 0.0022` to model that. Since ed3363d the Engine chains each micro-batch's next
step at pp > 1 too (the last stage hands its tokens to the first): `--lookahead --in-flight 0`
models its default of pp micro-batches.

Where it has been wrong: it put 2,048 tokens a step 1.7 % ahead of 4,096 at pp=2 on H200, and
measured (2x H200, 2026-11-28) 2,048 lost 4.3 %, the first stage's steps that carried prompt
tokens taking 9 % longer in all (3.51 s against 3.22). Trust its rankings of layouts more than
its rankings of step budgets.
"""

from __future__ import annotations

import argparse
import heapq

from energon.bench.limits import step_floor
from energon.scheduler import Scheduler
from energon.sequence import Sequence

# opt-13b, fp16
LAYERS, HIDDEN, VOCAB = 40, 5120, 50272
LAYER_PARAMS = 12 * HIDDEN * HIDDEN  # q, k, v, o + two 4x MLP matrices
KV_PER_TOKEN = 2 * LAYERS * HIDDEN * 2  # bytes, whole model
# H100 SXM, measured in the same process as the bench
MATMUL, BANDWIDTH = 755e12, 2.95e12
MATMUL_EFF, BANDWIDTH_EFF = 0.82, 0.84
STEP_COST = 0.3e-3  # s of fixed cost per stage step (launches, small kernels)
TURNAROUND = 10e-3  # s from a step's end on the last stage to the next step's start on stage 0
HOP = 0.1e-3  # s to hand activations to the next stage
HAND_BACK = 0.1e-3  # s from the last stage's end to the first stage holding its tokens (lookahead)


CARDS = {  # matmul rate, copy bandwidth, KV cache bytes at pp=1 and per stage at pp=4
    "h100": (MATMUL, BANDWIDTH, 43.7e9, 57.3e9),
    "h200": (745e12, 4.13e12, 102e9, 118e9),  # 4x H200 runs of 2026-11-27/28
}


def stage_seconds(
    plan, pp: int, last: bool, head: str = "last", matmul: float = MATMUL, bandwidth=BANDWIDTH
) -> float:
    """One stage's time for a plan: the benches' step-wise roofline (energon.bench.limits) at
    the calibrated efficiencies, plus a fixed cost. The LM head's weights are read by the last
    stage (`head="last"`, the Engine) or a pp-th of them by every stage (`"spread"`: a what-if,
    each stage computing a slice of the vocabulary). Attention FLOPs are left out, as there:
    ~1 % of a 512-token prompt's."""
    mparams = LAYER_PARAMS * LAYERS / pp
    head_bytes = 2 * VOCAB * HIDDEN if plan.num_samples else 0
    weights = 2 * mparams + (head_bytes / pp if head == "spread" else head_bytes if last else 0)
    attended = sum(s.context_len for s in plan.seqs)
    rate, bandwidth = matmul * MATMUL_EFF, bandwidth * BANDWIDTH_EFF
    kv_tok = KV_PER_TOKEN / pp
    return (
        step_floor(plan.num_tokens, attended, mparams, weights, kv_tok, rate, bandwidth) + STEP_COST
    )


def simulate(pp: int, in_flight: int, kv_bytes_per_stage: float, args) -> dict:
    """Serves `args.requests` prompts at once; returns tokens/s and per-stage busy fractions.
    With `args.lookahead` at pp > 1 each micro-batch's next step is chained as the Engine does:
    sent at once, it starts on the first stage, in order behind the steps sent before it, once
    the step it chains has left the last stage (plus HAND_BACK)."""
    chain = bool(getattr(args, "lookahead", False)) and pp > 1
    head = getattr(args, "head", "last")
    matmul, bandwidth = CARDS[getattr(args, "card", "h100")][:2]
    block = 16
    blocks = int(kv_bytes_per_stage // (block * KV_PER_TOKEN / pp))
    budget = args.max_batch_tokens
    sched = Scheduler(
        blocks,
        block,
        max_num_seqs=args.requests,
        max_batch_tokens=budget // in_flight if args.balanced else budget,
        max_model_len=args.prompt_len + args.gen_len,
        micro_batches=in_flight,
        lookahead=chain,
    )
    for i in range(args.requests):
        sched.add(Sequence(i, [1] * args.prompt_len, args.gen_len))
    # lookahead at pp=1 chains steps: no turnaround between them
    turnaround = 0.0 if pp == 1 else args.turnaround
    free = [0.0] * pp  # when each stage is next free
    busy = [0.0] * pp
    ends: dict[int, float] = {}  # step id -> when the last stage finished it
    events: list = []  # (time the controller sees the reply, step id, plan)
    out = generated = 0

    def send(now: float) -> None:
        nonlocal out
        while out < in_flight * (1 + chain):
            plan = sched.schedule()
            if plan is None:
                return
            t = now + turnaround / 2
            if plan.chains is not None:  # its tokens come from the last stage, not the controller
                t = max(t, ends[plan.chains] + HAND_BACK)
            for s in range(pp):
                start = max(t, free[s])
                cost = stage_seconds(plan, pp, s == pp - 1, head, matmul, bandwidth)
                free[s] = start + cost
                busy[s] += cost
                t = free[s] + HOP
            ends[plan.step_id] = free[-1]
            heapq.heappush(events, (free[-1] + turnaround / 2, plan.step_id, plan))
            out += 1

    send(0.0)
    now = 0.0
    while events:
        now, _, plan = heapq.heappop(events)
        out -= 1
        got = sched.complete(plan, {s.seq_id: 1 for s in plan.seqs if s.sample})
        for seq in got:
            if seq.num_tokens - seq.num_prompt_tokens >= seq.max_tokens:
                generated += seq.max_tokens
                sched.finish(seq.seq_id)
        send(now)
    return {"rate": generated / now, "wall": now, "busy": [b / now for b in busy]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pp", default="1,2,4")
    p.add_argument("--in-flight", default="0,1", help="comma-separated K: pp + K in flight")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--max-batch-tokens", type=int, default=8192)  # the Engine's and the bench's
    p.add_argument("--card", default="h100", choices=sorted(CARDS))
    p.add_argument("--kv-pp1", type=float, default=None, help="KV bytes at pp=1 (the card's)")
    p.add_argument("--kv-stage", type=float, default=None, help="KV bytes a stage at pp>1")
    p.add_argument(
        "--head",
        default="last",
        choices=["last", "spread"],
        help="the LM head on the last stage (the Engine), or a slice of it on every stage",
    )
    p.add_argument("--balanced", action="store_true")
    p.add_argument("--turnaround", type=float, default=TURNAROUND, help="seconds")
    p.add_argument(
        "--lookahead", action="store_true", help="at pp > 1 chain each micro-batch's next step"
    )
    args = p.parse_args()
    base = None
    for pp in (int(v) for v in args.pp.split(",")):
        extras = [0] if pp == 1 else [int(v) for v in args.in_flight.split(",")]
        for k in extras:
            kv = args.kv_pp1 if pp == 1 else args.kv_stage
            if kv is None:
                kv = CARDS[args.card][2 if pp == 1 else 3]
            r = simulate(pp, pp + k if pp > 1 else 1, kv, args)
            base = base or r["rate"]
            busy = ", ".join(f"{b:.2f}" for b in r["busy"])
            n = pp + k if pp > 1 else 1
            print(
                f"pp={pp} in_flight={n}: {r['rate']:7.0f} tokens/s ({r['rate'] / base:.2f}x pp=1),"
                f" wall {r['wall']:.2f} s, stages busy {busy}"
            )


if __name__ == "__main__":
    main()
