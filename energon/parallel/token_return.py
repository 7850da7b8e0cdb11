"""Where a chained step's tokens come from: the step it chains sampled them (lookahead).

A step that chains another (energon/scheduler.py, lookahead) feeds the tokens that step samples,
which the controller does not know yet when it sends the step. The first stage embeds them and
the last stage's tp rank 0 samples them. At pp=1 those are the same ranks and the tokens stay
where they are. At pp > 1 the last stage's tp rank 0 sends each sampled step's tokens to the
first stage's tp rank 0 over a process group of their own (`ParallelState.return_group`), and
the first stage posts the matching receive when a later step needs them; a chained step then
waits for them on the first stage's device (NCCL) or thread (gloo), and the controller's round trip
between a micro-batch's steps leaves the pipeline's path. The other first-stage tp ranks only
learn the count and get the tokens from tp rank 0 by broadcast (`ModelRunner._chained_tokens`).

Every worker receives the steps in the same order and each step says how many rows it samples,
so the k-th send meets the k-th receive and no shape travels. Only a step still in flight can be
chained, so each step also says the oldest step the controller has in flight: the tokens of
earlier steps are never wanted again, and are dropped (a receive once it has completed).

The first stage posts a step's receive only when a later step needs those tokens or they are
dropped (all earlier receives first, in order). A receive posted as soon as its step was issued
starts once that step has run and then waits on the device for the whole trip through the later
stages, its kernel holding an SM while the first stage computes the next steps (its prefill steps
ran ~8 % slower on 4x H200). So a receive that no step asks for stays unposted until the
controller says the step is done with: when it goes idle it sends `forget_before` of every step
it issued (`ModelRunner.drop_returns`), and a worker posts what is left when it closes, so every
send meets its receive (NCCL completed these small sends without one in a test on 2x H200, but
a send that waited would meet the process group's timeout).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from energon.parallel.topology import ParallelState


class _Pending(NamedTuple):
    """A step's tokens awaited or held here."""

    work: dist.Work | None  # the receive (tp rank 0 at pp > 1), once posted
    tokens: torch.Tensor | None  # on tp rank 0, or on every tp rank when `everywhere`
    count: int
    everywhere: bool = False  # every tp rank keeps them: `keep(..., everywhere=True)`


class TokenReturn:
    """One rank's side: `keep` on the last stage's tp rank 0 (what it sampled), `expect` and
    `take` on every first-stage rank."""

    def __init__(self, state: ParallelState, device: torch.device):
        self.state = state
        self.device = device
        self.local = state.pp_size == 1  # the sampling rank embeds too: nothing travels
        self.keeps = state.is_last_stage and state.tp_rank == 0
        self.expects = state.is_first_stage
        self._pending: dict[int, _Pending] = {}  # by step id, in the order the steps came
        self._in_transit: list[tuple[dist.Work, torch.Tensor]] = []  # kept until completed

    @property
    def pending(self) -> int:
        """Steps whose tokens are awaited or held here, not taken yet."""
        return len(self._pending)

    def keep(self, step_id: int, tokens: torch.Tensor, everywhere: bool = False) -> None:
        """What step `step_id` sampled (token ids, one per sampled row): held here at pp=1,
        handed to the first stage at pp > 1. `everywhere` (pp=1): every tp rank keeps the
        same tokens (a greedy step's, out of the decode graph), so none is broadcast."""
        if self.local:
            self._pending[step_id] = _Pending(None, tokens, tokens.shape[0], everywhere)
            return
        if everywhere:
            raise ValueError("tokens are kept on every tp rank only at pp=1")
        tokens = tokens.to(torch.int64).contiguous()
        dst = self.state.topology.rank_of(0, 0)
        self._in_transit.append((dist.isend(tokens, dst, group=self.state.return_group), tokens))
        self._retire()

    def everywhere(self, step_id: int) -> bool:
        """Whether every tp rank keeps step `step_id`'s tokens (`keep(..., everywhere=True)`)."""
        entry = self._pending.get(step_id)
        return entry is not None and entry.everywhere

    def expect(self, step_id: int, count: int) -> None:
        """Step `step_id`, which samples `count` rows, has been issued here: its tokens will come
        (to tp rank 0 at pp > 1, whose receive is posted when they are taken or dropped; at pp=1
        tp rank 0 `keep`s them)."""
        if self.state.tp_rank == 0 and self.local:
            return
        self._pending[step_id] = _Pending(None, None, count)  # tp rank 0: receive not posted yet

    def _post_through(self, step_id: float) -> None:
        """On tp rank 0 at pp > 1, posts the receives of expected steps up to `step_id` not
        posted yet, in the order the steps were sent (`_pending` keeps that order)."""
        if self.state.tp_rank != 0 or self.local:
            return
        src = self.state.topology.rank_of(self.state.pp_size - 1, 0)
        for expected, entry in self._pending.items():
            if expected > step_id:
                break
            if entry.work is None:
                buffer = torch.empty(entry.count, dtype=torch.int64, device=self.device)
                work = dist.irecv(buffer, src, group=self.state.return_group)
                self._pending[expected] = entry._replace(work=work, tokens=buffer)

    def forget_before(self, step_id: float) -> None:
        """No step before `step_id` will be chained (the controller has them back; `math.inf`:
        none will, before the process group goes). Their receives are posted, in order, so that
        each send the last stage makes for them meets one. A no-op off the first stage."""
        if not self.expects:
            return
        self._post_through(step_id - 1)
        for older in [k for k in self._pending if k < step_id]:
            entry = self._pending.pop(older)
            if entry.work is not None:
                self._in_transit.append((entry.work, entry.tokens))
        self._retire()

    def take(self, step_id: int) -> tuple[torch.Tensor | None, int]:
        """(The tokens step `step_id` sampled, or None off tp rank 0; their count). The current
        stream (NCCL) or thread (gloo) waits for a receive. Raises ValueError if that step's
        tokens are not held or awaited here."""
        if step_id in self._pending:
            self._post_through(step_id)
        entry = self._pending.pop(step_id, None)
        if entry is None:
            raise ValueError(
                f"a step chains step {step_id}, whose tokens this stage does not hold or await"
            )
        if entry.work is not None:
            entry.work.wait()
        return entry.tokens, entry.count

    def _retire(self) -> None:
        """Forgets the transfers that completed. Gloo's sends only say so once waited for, so
        past `_MAX_IN_TRANSIT` the oldest are waited for (their receives are posted by then, or
        will be: the first stage posts them in order as it runs later steps)."""
        if self._in_transit:
            self._in_transit = [(w, t) for w, t in self._in_transit if not w.is_completed()]
        while len(self._in_transit) > _MAX_IN_TRANSIT:
            self._in_transit.pop(0)[0].wait()


_MAX_IN_TRANSIT = 64  # far more than steps in flight
