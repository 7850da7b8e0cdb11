"""Who runs next: continuous batching at iteration level (pure Python, no torch).

The Engine owns one `Scheduler` and drives it from its event loop:

    sched = Scheduler(num_blocks, block_size, max_num_seqs=64, max_batch_tokens=2048,
                      max_waiting=1024, max_model_len=4096, micro_batches=pp)
    sched.add(Sequence(seq_id, prompt_ids, max_tokens))   # InvalidRequest | Overloaded, at once
    plan = sched.schedule()          # StepPlan | None; its sequences are now "in flight"
    ...send plan to the workers; with pp > 1 call schedule() again (up to pp plans in flight)...
    got = sched.complete(plan, {seq_id: token_id, ...})   # when that step's reply arrives
    for seq in got: ... decide stop / length ... sched.finish(seq.seq_id)
    sched.abort(seq_id)              # any time, also while the sequence's step is in flight

Each `schedule()` call builds one micro-batch out of sequences that are not in flight, so plans
outstanding at the same time hold disjoint sequences and may complete in any order (this is what
keeps pp micro-batches independent). Within a step, up to `max_num_seqs` sequences share
`max_batch_tokens` new tokens, taken in this order:

1. running sequences that decode (one token left to compute), oldest first;
2. running sequences part-way through their prompt (chunked prefill), oldest first;
3. waiting sequences, first come first served (preempted ones keep their place by arrival),
   admitted while `max_running_seqs`, the budget and free blocks allow (never by preempting).
   With `reserve` > 0 a sequence is admitted only if, besides its own blocks, that fraction of
   the blocks the running sequences and it would still take to reach their longest (prompt +
   max_tokens - 1) stays free: 1.0 admits only what can run to max_tokens without preempting
   anyone; 0 (the default, as vLLM does) fills the cache with what runs now and preempts when
   it grows.
   No admission happens in a step where a running sequence was short of blocks (it preempted
   others or sat out): running sequences come first, and a victim does not bounce straight back.
   With `prefix_caching` an admitted sequence first adopts the cached blocks of its longest
   prefix of full blocks (energon/block_manager.py) and its step starts after them.
   A waiting sequence whose next full blocks (right after its cached prefix; `min_wait_tokens`
   of its tokens at least) a step in flight, or one already in this plan, is computing
   ("pending") is not admitted: it keeps its place and is admitted once that step has returned,
   adopting the blocks then, so that a burst of requests sharing a new prefix computes it once,
   not once a request (`wait_for_prefix`, on by default with prefix caching; the Engine turns it
   off with `ENERGON_PREFIX_WAIT=0`). Such a deferred sequence does not stop the queue: those
   behind it may be admitted, and it does not count as ready to run (for lookahead's chaining
   and the micro-batches' fair share).

A sequence runs `min(tokens left to compute, budget left)` tokens. Blocks for them are allocated
before the plan is returned. When a running sequence needs blocks and none are free, the newest
running sequences that are newer than it and not in flight (nor already in this plan) are
preempted, newest first: their blocks are freed, `num_computed_tokens` goes back to 0 and they
return to the waiting queue, to recompute prompt + generated tokens later. If that is not enough
the sequence sits this step out, keeping its blocks. Nothing is ever dropped: `add()` refuses
requests that could never fit, and the oldest sequence can take every block from newer ones once
their steps come back (no one is admitted while it waits, and every sequence has a bounded length).

A finished or aborted sequence frees its blocks at once, or, if a step that runs it is in flight,
when that step completes (the workers may still be writing those blocks); its result is ignored.

Lookahead (`lookahead=True`): `schedule()` may be called while plans are in flight. The new plan
then also *chains* the sequences that the oldest in-flight plan not chained yet samples: their
next decode step, at the position of the token being sampled, whose id the plan cannot know yet.
The workers feed it on the device from that step's sampled tokens (`ScheduledSeq.chained`; at
pp > 1 the last stage hands them to the first, energon/parallel/token_return.py), so the next
step is queued before the last one returns and the controller's round trip leaves the critical
path. With one micro-batch (pp=1) that is the last plan; with several, each micro-batch's plan is
chained in turn, so every micro-batch has its next step queued behind its current one. A
sequence is chained only if the pending token cannot be its last by length; if it turns out to
be the last (a stop token or string), the chained step's token is ignored like that of any
sequence finished while in flight. Chained plans complete in order.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass

from energon.block_manager import BlockManager
from energon.errors import InvalidRequest, Overloaded
from energon.sequence import Sequence, SequenceStatus

# A waiting sequence waits for a step in flight only to save at least this many tokens of its
# own computation (SGLang holds requests back for an in-batch shared prefix from 32 tokens):
# the wait costs it a step, recomputing a short header costs less.
MIN_WAIT_TOKENS = 32


def fraction(field: str, value) -> float:
    """`value` as a float from 0 to 1; InvalidRequest naming `field` otherwise (NaN too)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidRequest(field, f"must be a number from 0 to 1 (got {value!r})")
    return float(value)


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence's share of a step.

    The step computes tokens `start .. context_len - 1` of `seq` (`num_new_tokens` of them, at those
    positions), writes their K/V into `block_table`, attends over `context_len` tokens and, if
    `sample`, samples the token after them (the step reaches the end of the known tokens: the end
    of a prompt, a decode, or the end of a recompute).

    `chain_row` (lookahead): this is a decode of the token that the plan `StepPlan.chains` samples
    for this sequence, as that step's `chain_row`-th sampled row; its id is unknown when the plan
    is made (the workers take it from that step's output). None: the token ids are known.
    """

    seq: Sequence
    start: int  # num_computed_tokens before the step: position of the first new token
    num_new_tokens: int
    context_len: int  # start + num_new_tokens: tokens cached after the step
    block_table: tuple[int, ...]
    sample: bool
    chain_row: int | None = None
    fresh: bool = False  # the first step since the sequence was admitted: its computation
    # (re)started, from its first token or after its cached prefix

    @property
    def chained(self) -> bool:
        return self.chain_row is not None

    @property
    def seq_id(self) -> Hashable:
        return self.seq.seq_id

    @property
    def token_ids(self) -> list[int]:
        """The tokens this step feeds (stable until the plan completes); a chained step's one
        token is not known yet, so it gives []."""
        return self.seq.token_ids[self.start : self.context_len]

    @property
    def positions(self) -> range:
        return range(self.start, self.context_len)


@dataclass(frozen=True)
class StepPlan:
    """A micro-batch: what one step runs. `step_id` counts plans from 0; `chains`: the step_id
    of the plan whose sampled tokens its chained rows feed (lookahead), or None."""

    step_id: int
    seqs: tuple[ScheduledSeq, ...]
    chains: int | None = None

    @property
    def num_tokens(self) -> int:
        """New tokens in the step (the packed token dimension)."""
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def num_samples(self) -> int:
        """Sequences that sample a token in this step."""
        return sum(s.sample for s in self.seqs)


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics."""

    num_waiting: int
    num_running: int
    num_in_flight_steps: int
    num_used_blocks: int
    num_free_blocks: int
    num_preemptions: int  # since the scheduler was made
    prefix_cache_hit_tokens: int = 0  # tokens admitted sequences found cached
    prefix_cache_queried_tokens: int = 0  # tokens of the admitted sequences that looked


class Scheduler:
    """Continuous batching over a paged KV cache of `num_blocks` blocks of `block_size` tokens.

    `max_num_seqs` and `max_batch_tokens` bound one step (micro-batch); `max_running_seqs`
    (default `max_num_seqs` per micro-batch) bounds admitted
    sequences; `max_waiting` bounds the waiting queue (admission control); `max_model_len`
    (default None: no bound but the cache's) bounds prompt + max_tokens. With `micro_batches`
    > 1 (the steps the Engine keeps in flight) a step takes at most an even share of the
    sequences that could run. `lookahead` chains decode steps, `reserve` keeps room for the
    running sequences' growth when admitting (module docstring); `wait_for_prefix` (with
    `prefix_caching`) defers a waiting sequence whose next `min_wait_tokens` or more a step in
    flight computes.
    Raises InvalidRequest for a bound < 1 or a reserve outside [0, 1].
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_num_seqs: int = 256,
        max_batch_tokens: int = 8192,
        max_waiting: int = 4096,
        max_model_len: int | None = None,
        max_running_seqs: int | None = None,
        micro_batches: int = 1,
        lookahead: bool = False,
        reserve: float = 0.0,
        prefix_caching: bool = False,
        wait_for_prefix: bool = True,
        min_wait_tokens: int = MIN_WAIT_TOKENS,
    ):
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        # wait for a prefix that a step in flight computes (module docstring)
        self.wait_for_prefix = prefix_caching and wait_for_prefix
        self.min_wait_tokens = min_wait_tokens
        self.max_model_len = max_model_len  # None: only the cache bounds a sequence
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_waiting = max_waiting
        self.micro_batches = micro_batches
        self.lookahead = lookahead  # chain in-flight plans' samples (module docstring)
        self.reserve = fraction("reserve", reserve)  # of the growth to come, kept free
        self.max_running_seqs = (
            max_num_seqs * micro_batches if max_running_seqs is None else max_running_seqs
        )
        for name in (
            "max_num_seqs",
            "max_batch_tokens",
            "max_waiting",
            "max_model_len",
            "micro_batches",  # before max_running_seqs, which defaults to a multiple of it
            "max_running_seqs",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidRequest(name, f"must be >= 1 (got {value})")
        self._seqs: dict[Hashable, Sequence] = {}  # every sequence not yet released
        self._waiting: list[Sequence] = []  # sorted by arrival
        self._running: list[Sequence] = []  # sorted by arrival
        self._in_flight: dict[int, StepPlan] = {}  # step_id -> plan
        self._chained: set[int] = set()  # in-flight plans that a later in-flight plan chains
        self._next_arrival = 0
        self._next_step = 0
        self.num_preemptions = 0

    # ---- requests -------------------------------------------------------------------------

    def room(self, prompt_tokens: int) -> int:
        """The most tokens a prompt of this length may ask to generate (`add` refuses more):
        up to max_model_len, and what the whole KV cache holds (the last token is never
        cached). Below 1 when the prompt itself does not fit."""
        cache = self.blocks.capacity_tokens + 1 - prompt_tokens
        if self.max_model_len is None:
            return cache
        return min(self.max_model_len - prompt_tokens, cache)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; it can join the very next step.

        Raises InvalidRequest (naming the field) if it could never run: prompt or
        prompt + max_tokens beyond max_model_len or beyond what the whole KV cache holds, or a
        seq_id already in use. Raises Overloaded when `max_waiting` sequences already wait.
        """
        prompt, total = seq.num_tokens, seq.num_tokens + seq.max_tokens
        capacity = self.blocks.capacity_tokens
        max_len = total if self.max_model_len is None else self.max_model_len
        if prompt > max_len:
            raise InvalidRequest(
                "prompt", f"has {prompt} tokens; max_model_len is {self.max_model_len}"
            )
        if prompt > capacity:
            raise InvalidRequest(
                "prompt", f"has {prompt} tokens; the KV cache holds at most {capacity}"
            )
        if total > max_len:
            raise InvalidRequest(
                "max_tokens",
                f"is {seq.max_tokens}: prompt ({prompt}) + max_tokens must be <= "
                f"max_model_len ({self.max_model_len})",
            )
        # The last generated token is never fed back, so the cache holds at most total - 1.
        if total - 1 > capacity:
            raise InvalidRequest(
                "max_tokens",
                f"is {seq.max_tokens}: prompt ({prompt}) + max_tokens - 1 must be <= the "
                f"{capacity} tokens the KV cache holds",
            )
        if seq.seq_id in self._seqs:
            raise InvalidRequest("seq_id", f"{seq.seq_id!r} is already scheduled")
        if seq.status is not SequenceStatus.WAITING or seq.num_computed_tokens or seq.block_table:
            raise InvalidRequest("seq", f"{seq!r} must be new")
        if self.waiting_full:
            raise Overloaded(
                f"{len(self._waiting)} requests are already waiting "
                f"(max_waiting={self.max_waiting}); retry later"
            )
        seq.arrival = self._next_arrival
        self._next_arrival += 1
        self._seqs[seq.seq_id] = seq
        self._waiting.append(seq)  # newest arrival: the list stays sorted

    def abort(self, seq_id: Hashable) -> bool:
        """Stop a sequence wherever it is; return False if it is unknown or already released.

        Its blocks are freed now, or when its in-flight step completes (that result is ignored).
        """
        seq = self._seqs.get(seq_id)
        if seq is None or seq.is_finished:
            return False
        self._release(seq)
        return True

    def finish(self, seq_id: Hashable) -> Sequence:
        """Mark a sequence finished (the Engine saw stop or length) and free its blocks.

        Returns the sequence. Raises KeyError if it is unknown or already released.
        """
        seq = self._seqs.get(seq_id)
        if seq is None or seq.is_finished:
            raise KeyError(seq_id)
        self._release(seq)
        return seq

    def get(self, seq_id: Hashable) -> Sequence | None:
        """The sequence with this id, if it has not been released."""
        return self._seqs.get(seq_id)

    def _release(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.WAITING:
            self._waiting.remove(seq)
        elif seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        if not seq.in_flight:
            self.blocks.free(seq)
            del self._seqs[seq.seq_id]
        else:  # complete() frees it when its last step returns; its blocks are never registered
            self.blocks.forget_pending(seq)

    # ---- steps ----------------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """Build the next micro-batch from sequences not in flight; None if nothing can run.

        The returned plan's sequences are marked in flight until `complete(plan, ...)`.
        """
        budget = self.max_batch_tokens
        chosen: list[ScheduledSeq] = []
        chained, chain = self._chainable()  # seq -> where its pending token goes (lookahead)
        ready = [s for s in self._running if not s.in_flight or s in chain]
        max_seqs = self._fair_share(len(ready), refills=chained is not None)
        decodes = [s for s in ready if s in chain or s.num_uncomputed_tokens == 1]
        prefills = [s for s in ready if s not in chain and s.num_uncomputed_tokens > 1]
        short_of_blocks = False  # a running sequence preempted others or sat out for blocks
        for seq in decodes + prefills:
            if budget == 0 or len(chosen) == max_seqs:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            start, row = chain.get(seq, (seq.num_computed_tokens, None))
            n = 1 if seq in chain else min(seq.num_uncomputed_tokens, budget)
            need = start + n
            while not self.blocks.can_allocate(seq, need):
                victim = self._newest_preemptable(newer_than=seq)
                if victim is None:
                    break
                self._preempt(victim)
                short_of_blocks = True
            if not self.blocks.can_allocate(seq, need):
                short_of_blocks = True
                continue  # sits this step out, keeping its blocks
            chosen.append(self._take(seq, n, start, chain_row=row))
            budget -= n
        growth = 0  # blocks the running sequences would still take (only with a reserve)
        if self.reserve and self._waiting:
            growth = sum(map(self._blocks_to_longest, self._running))
        next_waiting = 0  # the first waiting sequence not deferred so far
        while (
            not short_of_blocks
            and next_waiting < len(self._waiting)
            and budget > 0
            and len(chosen) < max_seqs
            and len(self._running) < self.max_running_seqs
        ):
            seq = self._waiting[next_waiting]
            cached = self.blocks.match(seq)  # its prefix's blocks, computed already
            if self._defers(seq, cached):
                next_waiting += 1  # deferred: it waits for the step computing its next block
                continue
            start = len(cached) * self.blocks.block_size
            n = min(seq.num_tokens - start, budget)
            holds = self.blocks.blocks_for(start + n)  # blocks it holds after this step
            need = holds - len(cached) + self.blocks.num_evictable(cached)  # off the free count
            if self.reserve:
                growth += self._blocks_to_longest(seq) - holds  # its own, once it holds them
                need += math.ceil(self.reserve * growth - 1e-9)
            if need > self.blocks.num_free_blocks:
                break  # first come first served: nobody overtakes the head of the queue
            del self._waiting[next_waiting]
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self._running, seq, key=_by_arrival)
            self.blocks.adopt(seq, cached)
            seq.num_computed_tokens = start
            chosen.append(self._take(seq, n, start, fresh=True))
            budget -= n
        if not chosen:
            return None
        chains = chained if any(s.chained for s in chosen) else None
        if chains is not None:
            self._chained.add(chains)
        plan = StepPlan(self._next_step, tuple(chosen), chains)
        self._next_step += 1
        self._in_flight[plan.step_id] = plan
        return plan

    def _blocks_to_longest(self, seq: Sequence) -> int:
        """Blocks `seq` would still take to hold prompt + max_tokens - 1 tokens (the last
        generated token is never cached)."""
        return self.blocks.num_needed(seq, seq.num_prompt_tokens + seq.max_tokens - 1)

    def _fair_share(self, idle: int, refills: bool = False) -> int:
        """Sequences one step may take: with several micro-batches, an even share of the
        sequences that could run now (`idle`: the running ones `schedule` found ready, and
        those waiting that may be admitted) over the micro-batches not in flight, so that a
        burst of requests fills all of them instead of the first (which would leave the other
        pipeline stages idle): 4 requests over 3 free micro-batches go 2, 1, 1. A micro-batch
        is in flight while its newest plan is; a plan that chains one (`refills`) is that
        micro-batch's next, so it counts as free."""
        if self.micro_batches == 1:
            return self.max_num_seqs
        admissible = max(0, self.max_running_seqs - len(self._running))
        ready = idle + sum(1 for _ in itertools.islice(self._admissible_waiting(), admissible))
        free = max(1, self.micro_batches - self._busy_micro_batches() + refills)
        return max(1, min(self.max_num_seqs, -(-ready // free)))

    def _busy_micro_batches(self) -> int:
        """Micro-batches in flight: plans in flight that no later plan chains."""
        return len(self._in_flight) - len(self._chained)

    def _others_ready(self) -> bool:
        """Whether a sequence not in flight could run: a running one, or one waiting to be
        admitted (not deferred)."""
        if any(not s.in_flight for s in self._running):
            return True
        if len(self._running) >= self.max_running_seqs:
            return False
        return next(self._admissible_waiting(), None) is not None

    def _admissible_waiting(self) -> Iterator[Sequence]:
        """The waiting sequences, oldest first, but those deferred (`_defers`: a step in flight
        computes their next blocks)."""
        if not self.wait_for_prefix or not self.blocks.num_pending_blocks:
            return iter(self._waiting)
        blocks = self.blocks
        return (s for s in self._waiting if not self._defers(s, blocks.match(s)))

    def _defers(self, seq: Sequence, cached: list[int]) -> bool:
        """Whether waiting `seq` (its cached blocks `cached`) waits for a step in flight that
        computes at least `min_wait_tokens` of its next tokens."""
        if not self.wait_for_prefix:
            return False
        pending = self.blocks.pending_after(seq, cached) * self.blocks.block_size
        return pending > 0 and pending >= self.min_wait_tokens

    def _chainable(self) -> tuple[int | None, dict[Sequence, tuple[int, int]]]:
        """With lookahead: (the oldest in-flight plan not chained yet whose samples may be
        chained, and those of its sampled sequences that may run their next decode step before
        it returns, each with (that step's position: the plan's context_len, its row among the
        plan's sampled rows)); (None, {}) if there is none, or while a micro-batch is free and
        sequences not in flight could fill it (a chained step would queue behind the plan it
        chains). Not chained: a sequence in another step too, or whose pending token is its
        last by length (max_tokens)."""
        if not self.lookahead:
            return None, {}
        if self._busy_micro_batches() < self.micro_batches and self._others_ready():
            return None, {}  # a free micro-batch first: its step can start at once
        for plan in self._in_flight.values():  # oldest first
            if plan.step_id in self._chained:
                continue
            sampled = [item for item in plan.seqs if item.sample]
            chain = {
                item.seq: (item.context_len, row)
                for row, item in enumerate(sampled)
                if item.seq.in_flight == 1
                and item.seq.status is SequenceStatus.RUNNING
                and item.seq.num_output_tokens + 1 < item.seq.max_tokens
            }
            if chain:
                return plan.step_id, chain
        return None, {}

    def _take(
        self, seq: Sequence, n: int, start: int, chain_row: int | None = None, fresh: bool = False
    ) -> ScheduledSeq:
        self.blocks.allocate(seq, start + n)
        if self.wait_for_prefix and chain_row is None:  # a chained step's token is not known
            self.blocks.mark_pending(seq, start + n)
        seq.in_flight += 1
        return ScheduledSeq(
            seq=seq,
            start=start,
            num_new_tokens=n,
            context_len=start + n,
            block_table=tuple(seq.block_table),
            sample=chain_row is not None or start + n == seq.num_tokens,
            chain_row=chain_row,
            fresh=fresh,
        )

    def _newest_preemptable(self, newer_than: Sequence) -> Sequence | None:
        # Sequences taken into the plan being built are already marked in flight.
        for seq in reversed(self._running):
            if seq.arrival <= newer_than.arrival:
                return None
            if not seq.in_flight:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        bisect.insort(self._waiting, seq, key=_by_arrival)
        self.num_preemptions += 1

    def complete(self, plan: StepPlan, sampled: Mapping[Hashable, int]) -> list[Sequence]:
        """Record that `plan`'s step came back with `sampled` tokens (seq_id -> token id).

        Advances each sequence's `num_computed_tokens`, appends the sampled token where the step
        sampled, clears the in-flight marks and frees sequences finished or aborted meanwhile
        (once no other step runs them). Returns the live sequences that got a new token, in plan
        order. Raises ValueError (and changes nothing) if the plan is not in flight, a sampling
        sequence has no token, or a chained step comes back before the step it chains.
        """
        if self._in_flight.get(plan.step_id) is not plan:
            raise ValueError(f"step {plan.step_id} is not in flight (completed twice?)")
        live = [s for s in plan.seqs if not s.seq.is_finished]
        missing = [s.seq_id for s in live if s.sample and s.seq_id not in sampled]
        if missing:
            raise ValueError(f"step {plan.step_id} returned no sampled token for {missing}")
        early = [s.seq_id for s in live if s.chained and s.seq.num_tokens != s.context_len]
        if early:
            raise ValueError(f"step {plan.step_id} came back before the step it chains for {early}")
        del self._in_flight[plan.step_id]
        self._chained.discard(plan.step_id)
        got: list[Sequence] = []
        for item in plan.seqs:
            seq = item.seq
            seq.in_flight -= 1
            if seq.is_finished:  # finished or aborted while in flight: free it now
                if not seq.in_flight:
                    self.blocks.free(seq)
                    del self._seqs[seq.seq_id]
                continue
            seq.num_computed_tokens = item.context_len
            self.blocks.register(seq, item.context_len)  # its K/V written on every stage
            if item.sample:
                seq.append_token(sampled[seq.seq_id])
                got.append(seq)
        return got

    # ---- state, for the Engine and metrics ------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting_full(self) -> bool:
        """`add` would refuse a new sequence with Overloaded (`max_waiting` already wait)."""
        return len(self._waiting) >= self.max_waiting

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def oldest_in_flight(self) -> int | None:
        """The step_id of the oldest plan in flight (None: none is): only plans in flight can
        be chained."""
        return next(iter(self._in_flight), None)

    @property
    def next_step_id(self) -> int:
        """The step_id the next plan gets: every plan so far has a smaller one."""
        return self._next_step

    @property
    def in_flight(self) -> list[StepPlan]:
        """Plans returned by schedule() and not completed yet, oldest first."""
        return list(self._in_flight.values())

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting, running, or awaiting its in-flight step."""
        return bool(self._seqs)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_waiting=len(self._waiting),
            num_running=len(self._running),
            num_in_flight_steps=len(self._in_flight),
            num_used_blocks=self.blocks.num_used_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            num_preemptions=self.num_preemptions,
            prefix_cache_hit_tokens=self.blocks.hit_tokens,
            prefix_cache_queried_tokens=self.blocks.queried_tokens,
        )
