"""The hand-back of sampled tokens from the last pipeline stage to the first (gloo, 2 ranks):
receives are posted only when tokens are taken or dropped, in the order the steps were sent."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch

from energon.parallel.token_return import TokenReturn
from tests.parallel.gloo_group import run_in_gloo_group


def _tokens(step_id: int) -> torch.Tensor:
    return torch.tensor([100 * step_id, 100 * step_id + 1, 100 * step_id + 2])


def _sends_complete(returns: TokenReturn, within: float) -> bool:
    """Whether every transfer of this rank completed, waiting up to `within` s (a gloo send
    only says so once waited for)."""
    try:
        for work, _ in returns._in_transit:
            work.wait(timedelta(seconds=within))
    except RuntimeError:  # gloo: timed out
        return False
    return True


def _hand_back(state, steps: int, taken: list[int], dropped_before: int | None, drain: bool):
    """The last stage keeps `steps` steps' samples; the first expects them all, takes `taken`,
    then drops the steps before `dropped_before` and drains if told. Returns, on the first
    stage, what each take got and what is still pending; on the last, whether its sends
    completed."""
    returns = TokenReturn(state, torch.device("cpu"))
    if state.is_last_stage:
        for step in range(steps):
            returns.keep(step, _tokens(step))
        # a send left without its receive is the expected outcome of one case: wait less there
        return _sends_complete(returns, within=3.0 if dropped_before or drain else 1.0)
    for step in range(steps):
        returns.expect(step, 3)
    got = {}
    for step in taken:
        tokens, count = returns.take(step)
        got[step] = (tokens.tolist(), count)
    if dropped_before is not None:
        returns.forget_before(dropped_before)
    if drain:  # what a closing worker does
        returns.forget_before(math.inf)
    pending = returns.pending
    _sends_complete(returns, within=3.0)  # keep the receives alive until they land
    return got, pending


def test_taken_tokens_are_the_steps_own_whatever_was_taken_before():
    first, last = run_in_gloo_group(_hand_back, 1, 2, 6, [3, 5], 5, False)
    got, pending = first
    assert got == {3: (_tokens(3).tolist(), 3), 5: (_tokens(5).tolist(), 3)}
    assert pending == 0  # 0-2 were posted for 3's take, 4 for the drop
    assert last is True


@pytest.mark.parametrize("drop", ["forget_before", "drain"])
def test_tokens_no_step_takes_are_received_once_dropped(drop):
    first, last = run_in_gloo_group(
        _hand_back, 1, 2, 4, [1], 4 if drop == "forget_before" else None, drop == "drain"
    )
    assert first[0] == {1: (_tokens(1).tolist(), 3)}
    assert last is True  # every send met its receive: none waits for the group's timeout


def test_tokens_neither_taken_nor_dropped_leave_their_sends_waiting():
    # what the Engine's drop_returns when it goes idle is for
    first, last = run_in_gloo_group(_hand_back, 1, 2, 4, [1], None, False)
    assert first[1] == 3  # 0 (posted for 1's take), 2 and 3 (never posted)
    assert last is False


def _many_steps(state, steps: int):
    """The last stage keeps `steps` steps' samples; the first drops them all at once."""
    returns = TokenReturn(state, torch.device("cpu"))
    if state.is_last_stage:
        for step in range(steps):
            returns.keep(step, _tokens(step))
        return len(returns._in_transit), _sends_complete(returns, within=3.0)
    for step in range(steps):
        returns.expect(step, 3)
    returns.forget_before(steps)
    _sends_complete(returns, within=3.0)
    return returns.pending


def test_the_last_stage_holds_a_bounded_number_of_sends():
    # gloo's sends report completion only once waited for: they must not pile up step by step
    first, (held, complete) = run_in_gloo_group(_many_steps, 1, 2, 100)
    assert first == 0 and complete
    assert held <= 64


def _kept_everywhere(state):
    """At pp=1 each tp rank keeps a greedy step's tokens itself (`everywhere`); the flag goes
    with the tokens when taken or dropped. What each rank saw, in order."""
    returns = TokenReturn(state, torch.device("cpu"))
    for step in range(3):
        returns.expect(step, 3)
        returns.keep(step, _tokens(step), everywhere=step != 1)
    seen = [returns.everywhere(step) for step in range(3)]
    tokens, count = returns.take(0)
    seen += [tokens.tolist(), count, returns.everywhere(0)]
    returns.forget_before(2)  # drops step 1
    seen += [returns.everywhere(2), returns.pending]
    returns.take(2)
    seen += [returns.everywhere(2), returns.pending]
    return seen


def test_tokens_every_tp_rank_keeps_are_marked_until_taken_or_dropped():
    for seen in run_in_gloo_group(_kept_everywhere, 2, 1):
        assert seen == [True, False, True, _tokens(0).tolist(), 3, False, True, 1, False, 0]


def _everywhere_at_pp2(state):
    returns = TokenReturn(state, torch.device("cpu"))
    if not state.is_last_stage:
        return None
    try:
        returns.keep(0, _tokens(0), everywhere=True)
    except ValueError as exc:
        return str(exc)


def test_tokens_are_kept_everywhere_only_at_pp1():
    first, last = run_in_gloo_group(_everywhere_at_pp2, 1, 2)
    assert first is None and "only at pp=1" in last
