"""A scheduled step as the message every worker receives (see ModelRunner.sample_step).

Token ids travel as one int64 tensor frame and block tables as one padded int32 tensor frame, so
a decode step of hundreds of sequences costs a few small frames, not a large msgpack header.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from energon.scheduler import StepPlan

_PENDING = [0]  # a chained row's input id: the workers write the sampled token over it
_GREEDY = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, "logprobs": 0}


def step_message(
    plan: StepPlan,
    requests: Mapping,
    hand_back: int | None = None,
    release: list | None = None,
) -> dict:
    """The wire form of `plan`: {"step_id", "input_ids" [T] int64, "query_lens", "context_lens",
    "block_tables" [B, max_blocks] int32 (-1 padded), "sample" (row flags), "params" and "steps"
    (one per sampled row: SamplingParams.to_wire() and tokens generated so far), "features" (the
    sampled rows' RowFeatures ORed: what the Sampler must look for)}.

    A plan that chains another (lookahead) adds "chain_from" (that step's id), "chain_tokens"
    (the positions in input_ids of its chained rows' tokens, which travel as 0, a placeholder)
    and "chain_rows" (for each, the row of that step's sampled tokens that goes there).
    `hand_back` (lookahead: the oldest step id the controller has in flight) adds "hand_back":
    the step's sampled tokens are kept for a later step that chains it (at pp > 1 the last stage
    hands them to the first), and those of steps before that id are dropped
    (energon/parallel/token_return.py).

    A row of a request with a penalty or a logit_bias (its params carry "seq") adds "history"
    (its generated tokens), its bias ids and values, and with a repetition penalty "prompt", on
    the first step that samples it after its computation (re)started (`ScheduledSeq.fresh`,
    from its first token or after its cached prefix): admission, recompute after preemption, a
    worker restart (energon/penalties.py). `release` (ids of such
    sequences that ended) adds "release"."""
    ids: list[int] = []
    query_lens, context_lens, sample, params, steps = [], [], [], [], []
    features = 0
    width = max(len(s.block_table) for s in plan.seqs)
    pad = [-1] * width
    tables: list[int] = []  # the padded rows, one after another
    chain_tokens, chain_rows = [], []
    for s in plan.seqs:
        if s.chained:
            chain_tokens.append(len(ids))
            chain_rows.append(s.chain_row)
        ids.extend(_PENDING if s.chained else s.seq.token_ids[s.start : s.context_len])
        query_lens.append(s.num_new_tokens)
        context_lens.append(s.context_len)
        tables.extend(s.block_table)
        tables.extend(pad[len(s.block_table) :])
        sample.append(bool(s.sample))
        if s.fresh or s.sample:
            req = requests.get(s.seq_id)
            if req is not None and s.fresh:
                req.history_due = True
        if s.sample:
            generated = s.seq.num_output_tokens + s.chained  # + the pending token
            if req is None:
                params.append(_GREEDY)
            else:
                params.append(_row_params(req, s, generated))
                features |= req.features
            steps.append(generated)
    message = {
        "step_id": plan.step_id,
        "input_ids": torch.tensor(ids, dtype=torch.int64),
        "query_lens": query_lens,
        "context_lens": context_lens,
        "block_tables": torch.tensor(tables, dtype=torch.int32).view(len(plan.seqs), width),
        "sample": sample,
        "params": params,
        "steps": steps,
        "features": features,
    }
    if hand_back is not None:
        message["hand_back"] = hand_back
    if release:
        message["release"] = release
    if plan.chains is not None:
        message["chain_from"] = plan.chains
        message["chain_tokens"] = chain_tokens
        message["chain_rows"] = chain_rows
    return message


def _row_params(req, s, generated: int) -> dict:
    """The params a sampled row carries: the request's wire params (without its banned ids once
    it has generated min_tokens), plus its history when the worker's counts of a penalised
    request must be (re)built."""
    params = req.wire_params
    if "banned" in params and generated >= params["min_tokens"]:
        params = req.wire_params_unbanned
    if "seq" not in params or not req.history_due:
        return params
    req.history_due = False
    seq = s.seq
    row = {**params, **req.start_params}
    row["history"] = seq.token_ids[seq.num_prompt_tokens : s.context_len]
    if params.get("repetition_penalty", 1.0) != 1.0:
        row["prompt"] = seq.prompt_token_ids
    return row
