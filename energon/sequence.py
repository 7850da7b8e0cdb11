"""A request's state as the scheduler sees it (pure Python, no torch).

A `Sequence` holds a request's tokens (prompt, then generated), how many of them already have
their K/V in the cache (`num_computed_tokens`), the cache blocks that hold them (`block_table`),
and whether a step that runs it is still in flight.

The tokens still to compute are `token_ids[num_computed_tokens:]`. A step computes some of them;
when it reaches the last known token the step samples the next one. Prefill, chunked prefill,
decode (exactly one token left to compute: the last sampled one) and recompute after preemption
(everything left to compute again) are all this one rule.

Life cycle (driven by `energon.scheduler.Scheduler`):

    WAITING --admitted--> RUNNING --finish / abort--> FINISHED
       ^                     |
       +----preempted--------+   (blocks freed, num_computed_tokens = 0: recomputed later)
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable

from energon.errors import InvalidRequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued: not admitted yet, or preempted and to be recomputed
    RUNNING = "running"  # admitted: holds KV blocks; runs prefill chunks, then decode steps
    FINISHED = "finished"  # finished or aborted; its blocks are freed (once no step is in flight)


class Sequence:
    """One request: `Sequence(seq_id, prompt_token_ids, max_tokens)`.

    `seq_id` is any hashable id chosen by the caller. `max_tokens` bounds the generated tokens; the
    scheduler uses it only to check at `add()` that the request can ever fit (the Engine decides when
    a sequence finishes). Raises InvalidRequest for an empty prompt or max_tokens < 1.
    """

    __slots__ = (
        "seq_id",
        "token_ids",
        "num_prompt_tokens",
        "max_tokens",
        "status",
        "num_computed_tokens",
        "block_table",
        "in_flight",
        "arrival",
        "block_digests",
        "num_registered_blocks",
    )

    def __init__(self, seq_id: Hashable, prompt_token_ids: Iterable[int], max_tokens: int):
        token_ids = list(prompt_token_ids)
        if not token_ids:
            raise InvalidRequest("prompt", "must hold at least one token (got none)")
        if max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be >= 1 (got {max_tokens})")
        self.seq_id = seq_id
        self.token_ids: list[int] = token_ids  # prompt, then generated tokens
        self.num_prompt_tokens = len(token_ids)
        self.max_tokens = max_tokens
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_table: list[int] = []  # cache block ids; block i holds tokens [i*bs, (i+1)*bs)
        self.in_flight = 0  # steps that run it and have not come back yet (2: a chained one)
        self.arrival = -1  # FCFS order, set by Scheduler.add; larger is newer
        # prefix caching (energon/block_manager.py): digests of its full blocks of tokens, and
        # how many blocks of its table are findable by them
        self.block_digests: list[bytes] = []
        self.num_registered_blocks = 0

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens only."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose K/V are not in the cache yet: 1 while decoding, more while prefilling."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a sampled token; its K/V are computed by the step that feeds it back."""
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id!r}, {self.status.value}, tokens={self.num_tokens} "
            f"(prompt {self.num_prompt_tokens}), computed={self.num_computed_tokens}, "
            f"blocks={self.block_table}{', in flight' * bool(self.in_flight)})"
        )
