"""The step message of a real Scheduler's plans: what a sampled row's params carry as a request's
sequence is admitted, decodes, is preempted and recomputed, and ends."""

from __future__ import annotations

import pytest

from energon.request import Request
from energon.sampling import SamplingParams
from energon.scheduler import Scheduler
from energon.sequence import Sequence
from energon.step import step_message
from energon.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def run_step(scheduler: Scheduler, requests: dict, token: int, release=None) -> dict:
    """Plan, encode and complete one step, every sampled row getting `token`; the message."""
    plan = scheduler.schedule()
    message = step_message(plan, requests, release=release)
    scheduler.complete(plan, {s.seq_id: token for s in plan.seqs if s.sample})
    for s in plan.seqs:
        if s.sample:
            requests[s.seq_id].token_ids.append(token)  # what the Engine's on_token keeps
    return message


@pytest.mark.parametrize("prefix_caching", [False, True], ids=["computed", "prefix-cached"])
def test_a_penalised_rows_history_comes_on_its_first_sampled_step_and_after_a_recompute(
    prefix_caching,
):
    scheduler = Scheduler(
        num_blocks=16, block_size=4, max_batch_tokens=4, prefix_caching=prefix_caching
    )
    params = SamplingParams(max_tokens=8, repetition_penalty=1.2, min_tokens=2)
    req = Request(7, [1, 2, 3, 4, 5, 6], params, TOK)
    scheduler.add(Sequence(7, req.prompt_ids, params.max_tokens))
    requests = {7: req}
    first = run_step(scheduler, requests, 40)  # 4 of 6 prompt tokens: nothing sampled
    assert first["params"] == []
    second = run_step(scheduler, requests, 41)  # the rest: samples, with the (empty) history
    (row,) = second["params"]
    assert (row["seq"], row["history"], row["prompt"]) == (7, [], [1, 2, 3, 4, 5, 6])
    assert row["banned"] == sorted(TOK.eos_token_ids) and second["steps"] == [0]
    (decode,) = run_step(scheduler, requests, 42)["params"]
    assert "history" not in decode and "banned" in decode  # 1 generated: still banned
    (late,) = run_step(scheduler, requests, 43, release=[3])["params"]
    assert "banned" not in late and late["seq"] == 7  # 2 generated: min_tokens reached
    # preempted: the recompute's sampled row carries what it generated until then
    scheduler._preempt(scheduler.get(7))
    rows, starts = [], []
    while not rows:
        message = run_step(scheduler, requests, 44)
        rows = message["params"]
        starts.append(message["context_lens"][0] - message["query_lens"][0])
    assert rows[0]["history"] == [41, 42, 43] and rows[0]["prompt"] == [1, 2, 3, 4, 5, 6]
    # with prefix caching the recompute starts after its 2 cached blocks, in one step
    assert starts == ([8] if prefix_caching else [0, 4, 8])


def test_release_and_plain_requests():
    scheduler = Scheduler(num_blocks=8, block_size=4)
    req = Request(1, [5, 6], SamplingParams(max_tokens=4), TOK)
    scheduler.add(Sequence(1, req.prompt_ids, 4))
    message = run_step(scheduler, {1: req}, 9, release=[3, 4])
    assert message["release"] == [3, 4]
    assert message["params"] == [SamplingParams(max_tokens=4).to_wire()]  # no seq, no history
    assert "release" not in run_step(scheduler, {1: req}, 9)


def test_a_logit_bias_travels_once_with_the_history():
    scheduler = Scheduler(num_blocks=8, block_size=4)
    params = SamplingParams(max_tokens=4, logit_bias={9: -100, 3: 2.5})
    req = Request(2, [5, 6], params, TOK)
    scheduler.add(Sequence(2, req.prompt_ids, 4))
    (first,) = run_step(scheduler, {2: req}, 8)["params"]
    assert (first["bias_ids"], first["bias_values"], first["history"]) == (
        [3, 9],
        [2.5, -100.0],
        [],
    )
    assert first["seq"] == 2 and "prompt" not in first  # no repetition penalty
    (later,) = run_step(scheduler, {2: req}, 8)["params"]
    assert "bias_ids" not in later and "history" not in later and later["seq"] == 2
