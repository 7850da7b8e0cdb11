"""Sampled tokens handed from the last pipeline stage straight to the first (lookahead, pp > 1).

With pp > 1 the last stage samples and the first embeds. A step that chains another
(energon/scheduler.py, lookahead) feeds the tokens that step samples, which the controller does
not know yet when it sends the step. So the last stage's tp rank 0 sends each sampled step's
tokens to the first stage's tp rank 0 over a process group of their own
(`ParallelState.return_group`), and the first stage posts the matching receive when it runs that
step. A chained step then waits for them on the first stage's device (NCCL) or thread (gloo),
and the controller's round trip between a micro-batch's steps leaves the pipeline's path.

Every worker receives the steps in the same order and each step says how many rows it samples,
so the k-th send meets the k-th receive and no shape travels. Only a step still in flight can be
chained, so each step also says the oldest step the controller has in flight: the tokens of
earlier steps are never wanted again, and their receives are dropped once they have completed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from energon.parallel.topology import ParallelState


class TokenReturn:
    """One rank's side of the hand-back: `send` on the last stage's tp rank 0, `expect` and
    `take` on every first-stage rank (tp rank 0 receives; the others only learn the count and
    get the tokens from it by broadcast, `ModelRunner._chained_tokens`)."""

    def __init__(self, state: ParallelState, device: torch.device):
        self.state = state
        self.device = device
        pp1 = state.pp_size == 1
        self.sends = not pp1 and state.is_last_stage and state.tp_rank == 0
        self.expects = not pp1 and state.is_first_stage
        # step_id -> (receive, its buffer) on tp rank 0, (None, row count) elsewhere
        self._pending: dict[int, tuple[dist.Work | None, torch.Tensor | int]] = {}
        self._in_transit: list[tuple[dist.Work, torch.Tensor]] = []  # kept until completed

    @property
    def pending(self) -> int:
        """Steps whose tokens are awaited or held here, not taken yet."""
        return len(self._pending)

    def send(self, tokens: torch.Tensor) -> None:
        """Hand a sampled step's token ids (int64, one per sampled row) to the first stage."""
        self._retire()
        dst = self.state.topology.rank_of(0, 0)
        tokens = tokens.to(torch.int64).contiguous()
        self._in_transit.append((dist.isend(tokens, dst, group=self.state.return_group), tokens))

    def expect(self, step_id: int, count: int) -> None:
        """The step `step_id`, which samples `count` rows, has been issued here: post the receive
        of its tokens (tp rank 0)."""
        if self.state.tp_rank == 0:
            buffer = torch.empty(count, dtype=torch.int64, device=self.device)
            src = self.state.topology.rank_of(self.state.pp_size - 1, 0)
            self._pending[step_id] = (
                dist.irecv(buffer, src, group=self.state.return_group),
                buffer,
            )
        else:
            self._pending[step_id] = (None, count)

    def forget_before(self, step_id: int) -> None:
        """No step before `step_id` will be chained (the controller has them back)."""
        for older in [k for k in self._pending if k < step_id]:
            self._drop(older)
        self._retire()

    def take(self, step_id: int) -> tuple[torch.Tensor | None, int]:
        """(The tokens step `step_id` sampled, or None off tp rank 0; their count). The current
        stream (NCCL) or thread (gloo) waits for them. Raises ValueError if that step's tokens
        are not expected here."""
        entry = self._pending.pop(step_id, None)
        if entry is None:
            raise ValueError(
                f"a step chains step {step_id}, whose tokens this stage does not await"
            )
        work, tokens = entry
        if work is None:
            return None, tokens
        work.wait()
        return tokens, tokens.shape[0]

    def _drop(self, step_id: int) -> None:
        work, buffer = self._pending.pop(step_id)
        if work is not None:
            self._in_transit.append((work, buffer))

    def _retire(self) -> None:
        self._in_transit = [(w, t) for w, t in self._in_transit if not w.is_completed()]
