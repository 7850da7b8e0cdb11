"""Prefix caching in the block manager and the scheduler (pure Python): which blocks a new
sequence finds, sharing, eviction, and the steps a sequence with a cached prefix runs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_scheduler import (
    FakeWorkers,
    assert_outputs_as_sampled,
    expected_or_prompt,
    expected_token,
    simulate,
    workloads,
)

from energon.block_manager import BlockManager, block_digest
from energon.scheduler import Scheduler, StepPlan
from energon.sequence import Sequence, SequenceStatus

B = 4  # tokens a block


def computed(manager: BlockManager, seq_id, tokens: list[int]) -> Sequence:
    """A sequence whose K/V a step has computed: its blocks allocated and registered."""
    seq = Sequence(seq_id, tokens, max_tokens=4)
    manager.adopt(seq, manager.match(seq))
    manager.allocate(seq, len(tokens))
    manager.register(seq, len(tokens))
    return seq


def test_a_new_sequence_finds_its_longest_prefix_of_full_blocks_but_its_last_token():
    manager = BlockManager(16, B, prefix_caching=True)
    first = computed(manager, "a", list(range(10)))  # blocks: [0..3] [4..7] [8 9]
    assert manager.num_cached_blocks == 2  # the partial third block is not findable
    same_start = Sequence("b", list(range(9)) + [99], 4)
    assert manager.match(same_start) == first.block_table[:2]
    # exactly the two full blocks: the last token is computed again, so one block is found
    assert manager.match(Sequence("c", list(range(8)), 4)) == first.block_table[:1]
    # a different token in the second block: the first block only; in the first: nothing
    assert manager.match(Sequence("d", [0, 1, 2, 3, 4, 5, 0, 7, 8], 4)) == first.block_table[:1]
    assert manager.match(Sequence("e", [9] + list(range(1, 10)), 4)) == []
    # the same tokens at another position are another block (the digest chains the prefix)
    shifted = Sequence("f", [4, 5, 6, 7, 0, 1, 2, 3, 9], 4)
    assert manager.match(shifted) == []
    assert block_digest(b"", [4, 5, 6, 7]) != block_digest(
        block_digest(b"", [0, 1, 2, 3]), [4, 5, 6, 7]
    )


def test_without_prefix_caching_nothing_is_found():
    manager = BlockManager(16, B)
    first = computed(manager, "a", list(range(10)))
    assert manager.match(Sequence("b", list(range(10)), 4)) == []
    assert manager.num_cached_blocks == 0 and len(first.block_table) == 3


def test_shared_blocks_stay_in_use_until_every_holder_frees_them_then_stay_findable():
    manager = BlockManager(6, B, prefix_caching=True)
    first = computed(manager, "a", list(range(9)))
    second = Sequence("b", list(range(8)) + [50, 51], 4)
    manager.adopt(second, manager.match(second))
    manager.allocate(second, second.num_tokens)
    assert second.block_table[:2] == first.block_table[:2]
    assert second.block_table[2] != first.block_table[2]
    assert (manager.num_used_blocks, manager.num_free_blocks) == (4, 2)
    first_blocks = list(first.block_table)
    assert manager.free(first) == 3
    assert (manager.num_used_blocks, manager.num_free_blocks) == (3, 3)  # shared ones stay
    manager.free(second)
    assert (manager.num_used_blocks, manager.num_free_blocks) == (0, 6)
    # freed but cached: a later sequence still finds them, and adopting takes them off the free
    third = Sequence("c", list(range(9)), 4)
    found = manager.match(third)
    assert found == first_blocks[:2]
    assert manager.num_evictable(found) == 2
    manager.adopt(third, found)
    assert (manager.num_used_blocks, manager.num_free_blocks) == (2, 4)
    assert manager.hit_tokens == 2 * B + 2 * B  # second and third found two blocks each
    with pytest.raises(RuntimeError, match="already holds blocks"):
        manager.adopt(third, found)


def test_cached_blocks_are_handed_out_last_least_recently_freed_first_and_then_forgotten():
    manager = BlockManager(4, B, prefix_caching=True)
    old = computed(manager, "old", [1] * 4 + [0])  # blocks 0 (cached) and 1
    new = computed(manager, "new", [2] * 4 + [0])  # blocks 2 (cached) and 3
    old_block, new_block = old.block_table[0], new.block_table[0]
    manager.free(old)
    manager.free(new)
    assert manager.num_free_blocks == 4 and manager.num_cached_blocks == 2
    taker = Sequence("taker", [7] * 12, 4)
    manager.allocate(taker, 8)  # the two blocks without cached content first
    assert old_block not in taker.block_table and new_block not in taker.block_table
    manager.allocate(taker, 12)  # then the least recently freed cached one, forgotten
    assert taker.block_table[2] == old_block and manager.num_cached_blocks == 1
    assert manager.match(Sequence("x", [1] * 4 + [0], 4)) == []
    assert manager.match(Sequence("y", [2] * 4 + [0], 4)) == [new_block]
    old.block_table = [old_block, 5]  # a stale table: block 5 does not exist, old's is taken
    with pytest.raises(RuntimeError, match="is not in use"):
        manager.free(old)


def test_the_same_tokens_computed_twice_at_once_are_cached_once():
    manager = BlockManager(8, B, prefix_caching=True)
    a = computed(manager, "a", list(range(5)))
    b = Sequence("b", list(range(5)), 4)
    manager.allocate(b, 5)  # admitted before a's step came back: no blocks to find then
    manager.register(b, 5)
    assert manager.num_cached_blocks == 1
    assert manager.match(Sequence("c", list(range(5)), 4)) == a.block_table[:1]
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 8


def scheduler(num_blocks: int = 32, **kwargs) -> Scheduler:
    """Waiting for a pending prefix from one block on (the default asks for 32 tokens), so the
    hand cases below can use short prefixes."""
    kwargs.setdefault("min_wait_tokens", B)
    return Scheduler(num_blocks, B, max_batch_tokens=64, prefix_caching=True, **kwargs)


def run_to_end(sched: Scheduler, token: int = 3) -> None:
    """Run every plan until nothing is left, sampling `token` everywhere."""
    while (plan := sched.schedule()) is not None:
        got = sched.complete(plan, {s.seq_id: token for s in plan.seqs if s.sample})
        for seq in got:
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq.seq_id)


def test_a_request_after_one_with_the_same_prefix_computes_only_the_rest():
    sched = scheduler()
    prefix = list(range(10, 22))  # three full blocks
    sched.add(Sequence("first", prefix + [1, 2], 2))
    run_to_end(sched)
    sched.add(Sequence("second", prefix + [5], 2))
    plan = sched.schedule()
    [item] = plan.seqs
    assert (item.start, item.num_new_tokens, item.sample, item.fresh) == (12, 1, True, True)
    assert len(item.block_table) == 4
    stats = sched.stats()
    assert (stats.prefix_cache_hit_tokens, stats.prefix_cache_queried_tokens) == (12, 14 + 13)
    sched.complete(plan, {"second": 7})
    nxt = sched.schedule()
    assert nxt.seqs[0].start == 13 and not nxt.seqs[0].fresh  # decodes on as usual


def test_a_whole_prompt_in_the_cache_still_computes_its_last_token():
    sched = scheduler()
    prompt = list(range(40, 48))  # exactly two blocks
    sched.add(Sequence("first", prompt, 1))
    run_to_end(sched)
    sched.add(Sequence("again", prompt, 1))
    [item] = sched.schedule().seqs
    assert (item.start, item.num_new_tokens, item.sample) == (4, 4, True)


def test_without_waiting_requests_admitted_together_share_nothing_until_a_step_comes_back():
    sched = scheduler(wait_for_prefix=False)
    prompt = list(range(60, 70))
    sched.add(Sequence("a", prompt, 2))
    sched.add(Sequence("b", prompt, 2))
    plan = sched.schedule()
    assert [s.start for s in plan.seqs] == [0, 0]
    assert set(plan.seqs[0].block_table).isdisjoint(plan.seqs[1].block_table)
    assert sched.blocks.num_pending_blocks == 0


# ---- waiting for a prefix that a step in flight computes ------------------------------------

PREFIX = list(range(500, 512))  # three full blocks, new to the cache


def starts(plan: StepPlan | None) -> list[tuple[str, int, int]]:
    """(seq_id, start, new tokens) of each sequence in the plan."""
    assert plan is not None
    return [(s.seq_id, s.start, s.num_new_tokens) for s in plan.seqs]


def complete(sched: Scheduler, plan: StepPlan, token: int = 3) -> None:
    sched.complete(plan, {s.seq_id: token for s in plan.seqs if s.sample})


def test_a_burst_sharing_a_new_prefix_computes_it_once_then_the_rest_adopt_it():
    sched = scheduler()
    for i in range(4):
        sched.add(Sequence(f"r{i}", PREFIX + [i, 90 + i], 2))
    first = sched.schedule()
    # one computes the prefix; the others would compute it again, so they wait for it
    assert starts(first) == [("r0", 0, 14)]
    assert sched.schedule() is None and sched.num_waiting == 3
    complete(sched, first)
    second = sched.schedule()
    assert starts(second) == [("r0", 14, 1), ("r1", 12, 2), ("r2", 12, 2), ("r3", 12, 2)]
    assert all(
        s.fresh and s.block_table[:3] == first.seqs[0].block_table[:3] for s in second.seqs[1:]
    )
    assert sched.stats().prefix_cache_hit_tokens == 3 * 12


def test_without_waiting_a_burst_computes_its_shared_prefix_once_a_request():
    sched = scheduler(wait_for_prefix=False)
    for i in range(4):
        sched.add(Sequence(f"r{i}", PREFIX + [i, 90 + i], 2))
    assert [start for _, start, _ in starts(sched.schedule())] == [0, 0, 0, 0]


def test_a_deferred_request_does_not_hold_up_those_behind_it():
    sched = scheduler()
    sched.add(Sequence("a", PREFIX + [1], 2))
    sched.add(Sequence("b", PREFIX + [2], 2))
    sched.add(Sequence("other", list(range(800, 806)), 2))
    assert starts(sched.schedule()) == [("a", 0, 13), ("other", 0, 6)]
    assert sched.get("b").status is SequenceStatus.WAITING


def test_a_request_waits_for_the_block_after_its_cached_prefix_when_a_step_computes_it():
    sched = scheduler()
    sched.add(Sequence("a", PREFIX + [1], 2))
    first = sched.schedule()
    complete(sched, first)
    # with the prefix's three blocks cached, "long" computes a fourth, [7, 7, 7, 7]: "short"
    # would find it, so it waits; "other" has no fourth full block to find, so it does not
    sched.add(Sequence("long", PREFIX + [7, 7, 7, 7, 7], 2))
    sched.add(Sequence("short", PREFIX + [7, 7, 7, 7, 8], 2))
    sched.add(Sequence("other", PREFIX + [6], 2))
    plan = sched.schedule()
    assert starts(plan) == [("a", 13, 1), ("long", 12, 5), ("other", 12, 1)]
    complete(sched, plan)
    assert starts(sched.schedule())[-1] == ("short", 16, 1)  # found the fourth block


def test_a_request_waits_only_to_save_min_wait_tokens_of_its_own():
    # by default (32 tokens) a pending 12-token prefix is recomputed rather than waited for,
    # a pending 32-token one is waited for
    for prefix, waits in ((PREFIX, False), (list(range(400, 432)), True)):
        sched = Scheduler(32, B, max_batch_tokens=128, prefix_caching=True)
        assert sched.min_wait_tokens == 32
        sched.add(Sequence("a", prefix + [1], 2))
        sched.add(Sequence("b", prefix + [2], 2))
        assert [s.seq_id for s in sched.schedule().seqs] == (["a"] if waits else ["a", "b"])
    # what counts is the pending run right after the cached blocks: 2 of b's 3 blocks here
    sched = scheduler(min_wait_tokens=3 * B)
    sched.add(Sequence("a", PREFIX[:8] + [1], 2))
    sched.add(Sequence("b", PREFIX + [2], 2))
    assert [s.seq_id for s in sched.schedule().seqs] == ["a", "b"]


def test_a_prefix_computed_in_chunks_is_adopted_chunk_by_chunk():
    sched = Scheduler(32, B, max_batch_tokens=10, prefix_caching=True, min_wait_tokens=B)
    prefix = list(range(600, 616))  # four full blocks
    sched.add(Sequence("a", prefix + [1], 2))
    sched.add(Sequence("b", prefix + [2], 2))
    first = sched.schedule()
    assert starts(first) == [("a", 0, 10)]  # budget left, but b's first block is pending
    complete(sched, first)
    second = sched.schedule()
    assert starts(second) == [("a", 10, 7)]  # b found two blocks; its third is pending now
    complete(sched, second)
    assert starts(sched.schedule()) == [("a", 17, 1), ("b", 16, 1)]


def test_an_aborted_request_computing_a_prefix_is_not_waited_for():
    sched = scheduler()
    for seq_id in ("a", "b", "c"):
        sched.add(Sequence(seq_id, PREFIX + [ord(seq_id)], 2))
    first = sched.schedule()
    assert starts(first) == [("a", 0, 13)]
    sched.abort("a")  # its step is in flight: its blocks will never be registered
    second = sched.schedule()
    assert starts(second) == [("b", 0, 13)]  # b computes the prefix; c waits for b now
    complete(sched, first)  # a's step: ignored, its blocks freed; b's stay pending
    assert sched.schedule() is None
    complete(sched, second)
    third = sched.schedule()
    assert starts(third) == [("b", 13, 1), ("c", 12, 1)]
    assert sched.get("a") is None
    complete(sched, third)
    run_to_end(sched)
    assert not sched.has_unfinished()
    assert sched.blocks.num_free_blocks == 32 and sched.blocks.num_pending_blocks == 0


def test_a_request_deferred_for_a_prefix_does_not_keep_lookahead_from_chaining():
    sched = scheduler(micro_batches=2, lookahead=True)
    sched.add(Sequence("a", PREFIX + [1], 4))
    sched.add(Sequence("b", PREFIX + [2], 4))
    first = sched.schedule()
    assert starts(first) == [("a", 0, 13)]
    # b cannot run before a's step returns, so it does not hold a micro-batch free: a's next
    # decode is chained behind its first step
    second = sched.schedule()
    assert second is not None and second.chains == first.step_id
    assert starts(second) == [("a", 13, 1)]
    complete(sched, first)
    assert starts(sched.schedule()) == [("b", 12, 1)]  # into the other micro-batch


def test_requests_deferred_for_a_prefix_do_not_count_for_a_micro_batchs_share():
    sched = scheduler(max_num_seqs=8, micro_batches=3)
    for i in range(4):
        sched.add(Sequence(f"p{i}", PREFIX + [i], 2))
    for i in range(4):
        sched.add(Sequence(f"x{i}", [700 + i] * 5, 2))
    plans = list(iter(sched.schedule, None))
    # 8 waiting over 3 micro-batches: 3 a step; then the 2 not waiting for p0's prefix over the
    # 2 micro-batches left
    assert [[s.seq_id for s in p.seqs] for p in plans] == [["p0", "x0", "x1"], ["x2"], ["x3"]]


def test_a_preempted_sequence_comes_back_from_its_cached_blocks():
    sched = Scheduler(7, B, max_batch_tokens=64, prefix_caching=True)
    sched.add(Sequence("old", list(range(100, 108)), 12))  # 2 blocks, grows to 5
    sched.add(Sequence("new", list(range(200, 208)), 12))
    plan = sched.schedule()
    sched.complete(plan, {"old": 1, "new": 2})
    while sched.num_preemptions == 0:
        plan = sched.schedule()
        sched.complete(plan, {s.seq_id: 1 for s in plan.seqs if s.sample})
    victim = sched.get("new")
    assert victim.num_computed_tokens == 0 and not victim.block_table
    while sched.get("old") is not None:  # old runs to its end; new waits
        plan = sched.schedule()
        for seq in sched.complete(plan, {s.seq_id: 1 for s in plan.seqs if s.sample}):
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq.seq_id)
    [item] = sched.schedule().seqs
    # admitted again from its first blocks, which outlived the tail of its cached prefix
    assert item.seq_id == "new" and item.fresh and item.start >= 2 * B
    assert sched.stats().prefix_cache_hit_tokens == item.start


def test_blocks_in_use_are_the_distinct_blocks_of_the_tables():
    sched = scheduler(num_blocks=40)
    prefix = list(range(300, 316))
    for i in range(5):
        sched.add(Sequence(i, prefix + [i] * (i + 1), 3))
    first = sched.schedule()
    sched.complete(first, {s.seq_id: 9 for s in first.seqs if s.sample})
    for i in range(5, 9):
        sched.add(Sequence(i, prefix + [i], 3))
    plan = sched.schedule()
    tables = [set(s.block_table) for s in plan.seqs]
    shared = set.intersection(*[t for t, s in zip(tables, plan.seqs, strict=True) if s.fresh])
    assert len(shared) == 4  # the prefix's four blocks, held by every new sequence
    held = {b for seq_id in range(9) for b in sched.get(seq_id).block_table}
    assert sched.blocks.num_used_blocks == len(held)
    assert sched.blocks.num_used_blocks + sched.blocks.num_free_blocks == 40


# ---- the randomized simulation of tests/engine/test_scheduler.py, prompts sharing prefixes --


class ContentWorkers(FakeWorkers):
    """FakeWorkers whose cache slots hold (position, token), whoever wrote them: a sequence reads
    what its own tokens would have written, and writes only into blocks it holds alone."""

    def __init__(self, sched: Scheduler):
        super().__init__(sched.blocks.block_size)
        self.sched = sched

    def run(self, plan: StepPlan) -> dict[int, int]:
        sampled = {}
        for item in plan.seqs:
            seq = item.seq
            tokens = [self.sampled[plan.chains][item.chain_row]] if item.chained else item.token_ids
            for position, token in zip(item.positions, tokens, strict=True):
                block = item.block_table[position // self.block_size]
                assert self.sched.blocks._used[block] == 1, "a write into a shared block"
                self.cache[self.slot(item.block_table, position)] = (position, token)
            for position in range(item.context_len):
                got = self.cache[self.slot(item.block_table, position)]
                assert got == (position, expected_or_prompt(seq, position))
            if item.sample:
                sampled[seq.seq_id] = expected_token(seq.seq_id, item.context_len)
        self.sampled[plan.step_id] = [sampled[s.seq_id] for s in plan.seqs if s.sample]
        return sampled


def shared_prompt(seq_id: int, prompt_len: int, max_tokens: int) -> Sequence:
    """Prompts that agree on a prefix whose length depends on the id (0 to 14 tokens), then differ."""
    common = seq_id % 8 * 2
    return Sequence(
        seq_id, [p if p < common else seq_id * 1000 + p for p in range(prompt_len)], max_tokens
    )


def check_sharing(sched: Scheduler, seqs: list[Sequence], plans: list[StepPlan]) -> None:
    held = {block for seq in seqs for block in seq.block_table}
    assert sched.blocks.num_used_blocks == len(held), "blocks in use != the tables' blocks"
    # a deferred sequence waits only for a step in flight: every pending block is one's
    computing = {block for plan in plans for item in plan.seqs for block in item.block_table}
    assert set(sched.blocks._pending.values()) <= computing, "a pending block no step computes"
    assert sched.blocks.num_used_blocks + sched.blocks.num_free_blocks == sched.blocks.num_blocks
    for seq in seqs:
        if seq.status is SequenceStatus.RUNNING and not seq.in_flight:
            assert len(seq.block_table) == -(-seq.num_computed_tokens // sched.blocks.block_size)


@settings(max_examples=300, deadline=None)
@given(
    workloads(),
    st.randoms(use_true_random=False),
    st.booleans(),
    st.booleans(),
    st.sampled_from([1, 8]),
)
def test_random_shared_prefix_workload_reads_right_and_leaks_nothing(
    workload, rng, lookahead, wait_for_prefix, min_wait_tokens
):
    config, pp, requests = workload
    sched = Scheduler(
        config["num_blocks"],
        config["block_size"],
        max_num_seqs=config["max_num_seqs"],
        max_batch_tokens=config["max_batch_tokens"],
        max_running_seqs=pp * config["max_num_seqs"],
        micro_batches=pp,
        lookahead=lookahead,
        prefix_caching=True,
        wait_for_prefix=wait_for_prefix,
        min_wait_tokens=min_wait_tokens,
    )
    finished, aborted = simulate(
        sched,
        config,
        requests,
        in_flight=pp * (1 + lookahead),
        # lookahead's chained plans come back in order; without it, in any order
        next_reply=(lambda plans: 0) if lookahead else (lambda plans: rng.randrange(len(plans))),
        ends=lambda seq: seq.num_output_tokens == seq.max_tokens or rng.random() < 0.1,
        check=lambda seqs, plans: check_sharing(sched, seqs, plans),
        workers=ContentWorkers(sched),
        make=shared_prompt,
    )
    assert_outputs_as_sampled(requests, finished, aborted)
