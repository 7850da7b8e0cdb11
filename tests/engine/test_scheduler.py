"""Specification of the scheduler: continuous batching over a paged KV cache (no torch needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from energon.block_manager import BlockManager
from energon.errors import InvalidRequest, Overloaded
from energon.scheduler import Scheduler, StepPlan
from energon.sequence import Sequence, SequenceStatus


def make_seq(seq_id: int, prompt_len: int, max_tokens: int = 8) -> Sequence:
    return Sequence(seq_id, [seq_id * 1000 + i for i in range(prompt_len)], max_tokens)


def shares(plan: StepPlan | None) -> list[tuple[int, int]]:
    """(seq_id, new tokens) of each sequence in the plan, in plan order."""
    assert plan is not None
    return [(s.seq_id, s.num_new_tokens) for s in plan.seqs]


def sample_all(plan: StepPlan, token: int = 7) -> dict[int, int]:
    return {s.seq_id: token for s in plan.seqs if s.sample}


def run_step(sched: Scheduler, token: int = 7) -> StepPlan:
    plan = sched.schedule()
    assert plan is not None
    sched.complete(plan, sample_all(plan, token))
    return plan


def test_scheduler_modules_do_not_import_torch():
    code = (
        "import sys, energon.scheduler, energon.block_manager, energon.sequence; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_prefill_chunks_and_decodes_share_the_token_budget():
    sched = Scheduler(64, 4, max_num_seqs=8, max_batch_tokens=10)
    sched.add(make_seq(0, 3))
    sched.add(make_seq(1, 3))
    assert shares(run_step(sched)) == [(0, 3), (1, 3)]  # 3 + 3 = 6 <= 10
    sched.add(make_seq(2, 20))
    plan = sched.schedule()
    # two decodes take 1 + 1 = 2 tokens; the new prompt gets the rest: 10 - 2 = 8 of its 20
    assert shares(plan) == [(0, 1), (1, 1), (2, 8)]
    assert plan.num_tokens == 10
    assert [s.sample for s in plan.seqs] == [True, True, False]


def test_chunked_prefill_runs_over_several_steps_and_samples_at_the_prompts_end():
    sched = Scheduler(64, 4, max_num_seqs=8, max_batch_tokens=8)
    seq = make_seq(0, 20)
    sched.add(seq)
    got = []
    for _ in range(4):
        plan = sched.schedule()
        (item,) = plan.seqs
        got.append((item.start, item.num_new_tokens, item.context_len, item.sample))
        sched.complete(plan, {0: 42} if item.sample else {})
    # 20 prompt tokens in chunks of 8: [0, 8), [8, 16), [16, 20) samples token 42 at position 20;
    # then a decode feeds 42 back: [20, 21)
    assert got == [(0, 8, 8, False), (8, 8, 16, False), (16, 4, 20, True), (20, 1, 21, True)]
    assert plan.seqs[0].token_ids == [42]
    assert seq.num_computed_tokens == 21
    assert seq.output_token_ids == [42, 42]


def test_chunk_feeds_the_right_tokens_and_positions():
    sched = Scheduler(64, 4, max_batch_tokens=4)
    sched.add(make_seq(3, 6))
    run_step(sched)  # tokens [0, 4)
    (item,) = sched.schedule().seqs
    assert item.token_ids == [3004, 3005]  # prompt token i of seq 3 is 3000 + i
    assert list(item.positions) == [4, 5]


def test_new_request_joins_at_the_next_step():
    sched = Scheduler(64, 4, max_batch_tokens=100)
    sched.add(make_seq(0, 5))
    plan = sched.schedule()
    sched.add(make_seq(1, 4))  # arrives while step 0 is in flight
    sched.complete(plan, {0: 9})
    assert shares(sched.schedule()) == [(0, 1), (1, 4)]


def test_waiting_requests_are_admitted_first_come_first_served_up_to_max_num_seqs():
    sched = Scheduler(64, 4, max_num_seqs=2, max_running_seqs=3, max_batch_tokens=100)
    for i in range(3):
        sched.add(make_seq(i, 2))
    assert shares(sched.schedule()) == [(0, 2), (1, 2)]  # 2 sequences per step
    assert shares(sched.schedule()) == [(2, 2)]  # the third, in the next micro-batch


def test_max_running_seqs_bounds_admission():
    sched = Scheduler(64, 4, max_num_seqs=4, max_running_seqs=2, max_batch_tokens=100)
    for i in range(3):
        sched.add(make_seq(i, 2))
    assert shares(run_step(sched)) == [(0, 2), (1, 2)]
    assert shares(run_step(sched)) == [(0, 1), (1, 1)]  # seq 2 waits: 2 running already
    sched.finish(0)
    assert shares(sched.schedule()) == [(1, 1), (2, 2)]


def test_blocks_allocated_as_the_sequence_grows_across_block_boundaries():
    sched = Scheduler(8, 4, max_batch_tokens=100)
    seq = make_seq(0, 4)
    sched.add(seq)
    tables = []
    for _ in range(6):
        plan = run_step(sched)
        tables.append((plan.seqs[0].context_len, len(seq.block_table)))
    # blocks of 4 tokens: ceil(context / 4); the prompt fills block 0 exactly, token 5 opens a
    # second block, token 9 a third
    assert tables == [(4, 1), (5, 2), (6, 2), (7, 2), (8, 2), (9, 3)]
    assert seq.block_table == [0, 1, 2]
    assert sched.blocks.num_used_blocks == 3
    assert sched.blocks.num_free_blocks == 8 - 3


def test_prompt_one_past_a_block_boundary_takes_two_blocks():
    sched = Scheduler(8, 4)
    sched.add(make_seq(0, 5))
    (item,) = sched.schedule().seqs
    assert item.block_table == (0, 1)  # ceil(5 / 4) = 2


def test_finish_frees_the_blocks():
    sched = Scheduler(8, 4)
    seq = make_seq(0, 6)
    sched.add(seq)
    run_step(sched)
    assert sched.blocks.num_used_blocks == 2  # ceil(6 / 4)
    assert sched.finish(0) is seq
    assert seq.status is SequenceStatus.FINISHED
    assert seq.block_table == []
    assert (sched.blocks.num_used_blocks, sched.blocks.num_free_blocks) == (0, 8)
    assert not sched.has_unfinished()


def test_abort_frees_running_and_waiting_sequences_at_once():
    sched = Scheduler(8, 4, max_num_seqs=1)
    sched.add(make_seq(0, 6))
    sched.add(make_seq(1, 3))
    run_step(sched)  # seq 0 runs (2 blocks), seq 1 waits (max_num_seqs=1)
    assert sched.abort(1) is True
    assert sched.num_waiting == 0
    assert sched.abort(0) is True
    assert sched.blocks.num_used_blocks == 0
    assert sched.abort(0) is False  # already gone
    assert sched.schedule() is None


def test_abort_while_in_flight_frees_when_the_step_returns_and_ignores_its_result():
    sched = Scheduler(8, 4)
    sched.add(make_seq(0, 6))
    sched.add(make_seq(1, 3))
    plan = sched.schedule()
    assert sched.abort(0) is True
    assert sched.blocks.num_used_blocks == 3  # 2 + 1: workers may still write seq 0's blocks
    assert sched.schedule() is None  # seq 0 is not scheduled again
    got = sched.complete(plan, {0: 5, 1: 6})
    assert [s.seq_id for s in got] == [1]  # seq 0's token is ignored
    assert sched.blocks.num_used_blocks == 1
    assert sched.get(0) is None
    assert shares(sched.schedule()) == [(1, 1)]


def test_preempts_the_newest_when_blocks_run_out_then_recomputes_it():
    sched = Scheduler(4, 4, max_batch_tokens=100)
    a, b = make_seq(0, 8), make_seq(1, 8)
    sched.add(a)
    sched.add(b)
    run_step(sched, token=50)  # 2 + 2 blocks: the cache is full
    plan = sched.schedule()
    # a's 9th token needs a 3rd block: b (newer) is preempted and frees 2; no admission this step
    assert shares(plan) == [(0, 1)]
    assert (b.status, b.num_computed_tokens, b.block_table) == (SequenceStatus.WAITING, 0, [])
    assert b.output_token_ids == [50]  # kept: it is recomputed, not re-sampled
    assert sched.stats().num_preemptions == 1
    sched.complete(plan, {0: 51})
    # b must recompute 8 + 1 = 9 tokens = 3 blocks, only 4 - 3 = 1 is free: it waits
    assert shares(run_step(sched)) == [(0, 1)]
    sched.finish(0)
    (item,) = sched.schedule().seqs
    assert (item.seq_id, item.start, item.num_new_tokens, item.sample) == (1, 0, 9, True)
    assert item.token_ids == b.prompt_token_ids + [50]


def test_preemption_skips_sequences_in_flight():
    sched = Scheduler(3, 4, max_num_seqs=2, max_running_seqs=3, max_batch_tokens=100)
    for i in range(3):
        sched.add(make_seq(i, 4))
    first, second = sched.schedule(), sched.schedule()
    assert (shares(first), shares(second)) == ([(0, 4), (1, 4)], [(2, 4)])  # 3 blocks: full
    sched.complete(first, sample_all(first))
    # seq 0's 5th token needs a 2nd block; seq 2 is newest but in flight, so seq 1 is preempted
    assert shares(sched.schedule()) == [(0, 1)]
    assert sched.get(1).status is SequenceStatus.WAITING
    assert sched.get(2).block_table == [2]


def test_newest_sequence_short_of_blocks_sits_out_and_keeps_its_blocks():
    sched = Scheduler(3, 4, max_batch_tokens=100)  # holds 3 * 4 = 12 tokens
    sched.add(make_seq(0, 3, max_tokens=4))
    sched.add(make_seq(1, 8, max_tokens=4))
    run_step(sched)  # 1 + 2 blocks: full
    plan = sched.schedule()
    # seq 0's 4th token fits its block; seq 1's 9th token needs a 3rd block of its own, none is
    # free and nobody newer can give one: it sits out with its 2 blocks and is not preempted
    assert shares(plan) == [(0, 1)]
    assert sched.get(1).block_table == [1, 2]
    assert sched.stats().num_preemptions == 0


def test_overloaded_past_max_waiting():
    sched = Scheduler(64, 4, max_num_seqs=1, max_waiting=2)
    sched.add(make_seq(0, 2))
    sched.add(make_seq(1, 2))
    with pytest.raises(Overloaded):
        sched.add(make_seq(2, 2))
    assert sched.num_waiting == 2  # the refused request left no trace
    sched.schedule()  # admits seq 0: one waiting
    sched.add(make_seq(2, 2))
    assert sched.num_waiting == 2


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "field"),
    [
        (33, 1, "prompt"),  # longer than max_model_len = 32
        (30, 3, "max_tokens"),  # 30 + 3 = 33 > 32
        (0, 1, "prompt"),
        (4, 0, "max_tokens"),
    ],
)
def test_invalid_request_names_the_field(prompt_len, max_tokens, field):
    sched = Scheduler(64, 4, max_model_len=32)
    with pytest.raises(InvalidRequest) as err:
        sched.add(Sequence(0, [1] * prompt_len, max_tokens))
    assert err.value.field == field


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "field"), [(17, 1, "prompt"), (8, 10, "max_tokens")]
)
def test_request_the_cache_can_never_hold_is_refused(prompt_len, max_tokens, field):
    sched = Scheduler(4, 4, max_model_len=1000)  # the cache holds 4 * 4 = 16 tokens
    # 17 > 16; 8 + 10 - 1 = 17 cached tokens > 16 (the last token is never fed back)
    with pytest.raises(InvalidRequest) as err:
        sched.add(Sequence(0, [1] * prompt_len, max_tokens))
    assert err.value.field == field


def test_request_that_fills_the_cache_exactly_is_accepted():
    sched = Scheduler(4, 4, max_model_len=1000)
    sched.add(Sequence(0, [1] * 8, 9))  # 8 + 9 - 1 = 16 cached tokens: exactly 4 blocks


def test_duplicate_seq_id_is_refused():
    sched = Scheduler(64, 4)
    sched.add(make_seq(0, 2))
    with pytest.raises(InvalidRequest) as err:
        sched.add(make_seq(0, 2))
    assert err.value.field == "seq_id"


def test_in_flight_plans_are_disjoint_and_may_complete_out_of_order():
    sched = Scheduler(64, 4, max_num_seqs=2, max_running_seqs=8, max_batch_tokens=100)
    for i in range(8):
        sched.add(make_seq(i, 2))
    plans = [sched.schedule() for _ in range(4)]
    assert [shares(p) for p in plans] == [
        [(0, 2), (1, 2)],
        [(2, 2), (3, 2)],
        [(4, 2), (5, 2)],
        [(6, 2), (7, 2)],
    ]
    assert sched.schedule() is None  # every sequence is in flight
    sched.complete(plans[2], sample_all(plans[2]))
    assert shares(sched.schedule()) == [(4, 1), (5, 1)]  # only what came back runs again
    sched.complete(plans[3], sample_all(plans[3]))
    sched.complete(plans[0], sample_all(plans[0]))
    assert shares(sched.schedule()) == [(0, 1), (1, 1)]  # oldest first
    assert shares(sched.schedule()) == [(6, 1), (7, 1)]
    assert len(sched.in_flight) == 4  # plans[1], and the three just made


def test_completing_a_plan_twice_is_refused():
    sched = Scheduler(64, 4)
    sched.add(make_seq(0, 2))
    plan = run_step(sched)
    with pytest.raises(ValueError, match="not in flight"):
        sched.complete(plan, {0: 1})


def test_missing_sampled_token_is_refused_and_changes_nothing():
    sched = Scheduler(64, 4)
    sched.add(make_seq(0, 2))
    plan = sched.schedule()
    with pytest.raises(ValueError, match="no sampled token"):
        sched.complete(plan, {})
    assert sched.get(0).in_flight
    sched.complete(plan, {0: 3})
    assert sched.get(0).output_token_ids == [3]


def test_block_manager_hands_out_lowest_ids_then_reuses_freed_ones():
    blocks = BlockManager(4, 2)
    a, b = make_seq(0, 1), make_seq(1, 1)
    assert blocks.allocate(a, 3) == [0, 1]  # ceil(3 / 2) = 2
    assert blocks.allocate(b, 2) == [2]
    assert blocks.allocate(a, 4) == []  # 4 tokens still fit 2 blocks
    blocks.free(a)
    assert not blocks.can_allocate(b, 2 * 5)  # b needs 5 - 1 = 4 more, 3 are free
    assert blocks.allocate(b, 2 * 4) == [3, 0, 1]
    assert blocks.usage == 1.0
    with pytest.raises(RuntimeError):
        blocks.allocate(b, 2 * 5)


# ---- a randomized simulation: nothing is dropped, nothing leaks ------------------------------


def expected_token(seq_id: int, position: int) -> int:
    """What the fake model samples at `position`: a pure function, so recompute re-derives it."""
    return (seq_id * 7919 + position * 31) % 1000


class FakeWorkers:
    """Runs steps in the order they are sent, like the workers: writes each new token's K/V into a
    flat cache at its slot, checks that attention would read the sequence's own tokens from every
    slot of its context, and samples `expected_token`."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.cache: dict[int, tuple[int, int, int]] = {}  # slot -> (seq_id, position, token)
        self.sampled: dict[int, list[int]] = {}  # step_id -> the tokens it sampled, in row order

    def slot(self, block_table: tuple[int, ...], position: int) -> int:
        block = block_table[position // self.block_size]
        return block * self.block_size + position % self.block_size

    def run(self, plan: StepPlan) -> dict[int, int]:
        sampled = {}
        for item in plan.seqs:
            seq = item.seq
            assert len(item.block_table) == -(-item.context_len // self.block_size)
            tokens = item.token_ids
            if item.chained:  # lookahead: the token the chained step sampled, fed here
                tokens = [self.sampled[plan.chains][item.chain_row]]
                assert item.num_new_tokens == 1 and item.context_len == seq.num_tokens + 1
            else:
                assert item.context_len <= seq.num_tokens
            for position, token in zip(item.positions, tokens, strict=True):
                self.cache[self.slot(item.block_table, position)] = (seq.seq_id, position, token)
            for position in range(item.context_len):
                got = self.cache[self.slot(item.block_table, position)]
                assert got == (seq.seq_id, position, expected_or_prompt(seq, position))
            if item.sample:
                sampled[seq.seq_id] = expected_token(seq.seq_id, item.context_len)
        self.sampled[plan.step_id] = [sampled[s.seq_id] for s in plan.seqs if s.sample]
        return sampled


def expected_or_prompt(seq: Sequence, position: int) -> int:
    if position < seq.num_prompt_tokens:
        return seq.token_ids[position]
    return expected_token(seq.seq_id, position)


def check_invariants(sched: Scheduler, seqs: list[Sequence], in_flight: list[StepPlan]) -> None:
    tables = [block for seq in seqs for block in seq.block_table]
    assert len(tables) == len(set(tables)), "a block is in two tables"
    assert sched.blocks.num_used_blocks == len(tables), "blocks in use != sum of tables"
    assert sched.blocks.num_used_blocks + sched.blocks.num_free_blocks == sched.blocks.num_blocks
    ids = [item.seq_id for plan in in_flight for item in plan.seqs]
    assert len(ids) == len(set(ids)), "a sequence is in two in-flight plans"
    assert {p.step_id for p in sched.in_flight} == {p.step_id for p in in_flight}
    for seq in seqs:
        assert seq.in_flight == (seq.seq_id in ids)
        if seq.in_flight:
            continue
        if seq.status is SequenceStatus.RUNNING:
            assert len(seq.block_table) == -(-seq.num_computed_tokens // sched.blocks.block_size)
        else:  # waiting to start or recompute, or released
            assert (seq.num_computed_tokens, seq.block_table) == (0, []) or seq.is_finished
            assert seq.block_table == []


@st.composite
def workloads(draw):
    num_blocks = draw(st.integers(2, 10))
    block_size = draw(st.integers(1, 4))
    capacity = num_blocks * block_size
    requests = []
    for seq_id in range(draw(st.integers(1, 12))):
        prompt_len = draw(st.integers(1, capacity))
        max_tokens = draw(st.integers(1, min(8, capacity - prompt_len + 1)))
        arrival = draw(st.integers(0, 15))
        abort_at = draw(st.none() | st.integers(0, 40))
        requests.append((seq_id, prompt_len, max_tokens, arrival, abort_at))
    config = dict(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=draw(st.integers(1, 4)),
        max_batch_tokens=draw(st.integers(1, 12)),
    )
    return config, draw(st.integers(1, 4)), requests


def scheduler_for(config: dict, **options) -> Scheduler:
    """A Scheduler of a drawn workload's cache and step bounds (and `options`)."""
    return Scheduler(
        config["num_blocks"],
        config["block_size"],
        max_num_seqs=config["max_num_seqs"],
        max_batch_tokens=config["max_batch_tokens"],
        **options,
    )


def arrive_and_abort(
    sched, requests, tick: int, seqs: dict, finished: dict, aborted: set, make=make_seq
) -> None:
    """Adds the workload's requests that arrive at `tick` (`make` makes their sequences); aborts
    those due then, unfinished."""
    for seq_id, prompt_len, max_tokens, arrival, abort_at in requests:
        if arrival == tick:
            seqs[seq_id] = make(seq_id, prompt_len, max_tokens)
            sched.add(seqs[seq_id])
        if abort_at == tick and arrival <= tick and seq_id not in finished:
            assert sched.abort(seq_id)
            aborted.add(seq_id)


def simulate(
    sched, config, requests, *, in_flight, next_reply, ends, check, workers=None, make=make_seq
):
    """Runs the workload's requests through `sched` with FakeWorkers until every one finished or
    was aborted: at most `in_flight` plans out at once, `next_reply(plans)` the index of the one
    that comes back next, `ends(seq)` whether a sequence finishes with the token it just got,
    `check(seqs, plans)` after every schedule and completion. Ends with nothing left to run and
    every block free; returns (finished: seq_id -> output tokens, aborted seq_ids). `workers`
    (default FakeWorkers) runs the plans; `make` makes the sequences (default make_seq)."""
    workers = workers or FakeWorkers(config["block_size"])
    seqs: dict[int, Sequence] = {}
    out: list[tuple[StepPlan, dict[int, int]]] = []
    finished: dict[int, list[int]] = {}
    aborted: set[int] = set()
    tick = 0
    while len(finished) + len(aborted) < len(requests) or out:
        assert tick < 5000, "no progress"
        arrive_and_abort(sched, requests, tick, seqs, finished, aborted, make)
        while len(out) < in_flight and (plan := sched.schedule()) is not None:
            assert len(plan.seqs) <= config["max_num_seqs"]
            assert plan.num_tokens <= config["max_batch_tokens"]
            out.append((plan, workers.run(plan)))
            check(list(seqs.values()), [p for p, _ in out])
        if not out:
            assert not sched.has_unfinished(), "live sequences but nothing scheduled"
        else:
            plan, sampled = out.pop(next_reply([p for p, _ in out]))
            for seq in sched.complete(plan, sampled):
                assert seq.num_output_tokens <= seq.max_tokens
                if ends(seq):
                    finished[seq.seq_id] = sched.finish(seq.seq_id).output_token_ids
            check(list(seqs.values()), [p for p, _ in out])
        tick += 1
    assert not sched.has_unfinished()
    assert sched.blocks.num_free_blocks == config["num_blocks"]
    return finished, aborted


@settings(max_examples=300, deadline=None)
@given(workloads(), st.randoms(use_true_random=False))
def test_random_workload_finishes_every_request_without_leaking_blocks(workload, rng):
    config, pp, requests = workload
    sched = scheduler_for(config, max_running_seqs=pp * config["max_num_seqs"])
    finished, aborted = simulate(
        sched,
        config,
        requests,
        in_flight=pp,
        next_reply=lambda plans: rng.randrange(len(plans)),  # the replies come back in any order
        ends=lambda seq: seq.num_output_tokens == seq.max_tokens,
        check=lambda seqs, plans: check_invariants(sched, seqs, plans),
    )
    for seq_id, prompt_len, max_tokens, _, _ in requests:
        if seq_id not in aborted:
            positions = range(prompt_len, prompt_len + max_tokens)
            assert finished[seq_id] == [expected_token(seq_id, p) for p in positions]


@settings(max_examples=300, deadline=None)
@given(workloads(), st.randoms(use_true_random=False))
def test_lookahead_chains_decodes_and_loses_or_leaks_nothing(workload, rng):
    """One micro-batch with lookahead, as the Engine runs pp=1: a plan is scheduled while the last
    is in flight, replies come back in order, and sequences also stop early at random (a stop
    token): the chained step's token is then ignored."""
    config, _, requests = workload
    sched = scheduler_for(config, lookahead=True)

    def at_most_two_steps_each(seqs, plans):
        assert all(s.in_flight <= 2 for s in seqs)

    finished, aborted = simulate(
        sched,
        config,
        requests,
        in_flight=2,
        next_reply=lambda plans: 0,  # in order, as one worker group replies
        ends=lambda seq: seq.num_output_tokens == seq.max_tokens or rng.random() < 0.1,
        check=at_most_two_steps_each,
    )
    assert_outputs_as_sampled(requests, finished, aborted)


@settings(max_examples=300, deadline=None)
@given(workloads(), st.randoms(use_true_random=False), st.sampled_from([0.0, 0.5, 1.0]))
def test_lookahead_over_micro_batches_loses_or_leaks_nothing(workload, rng, reserve):
    """Several micro-batches with lookahead, as the Engine runs pp > 1: up to two plans each in
    flight, replies in the order sent (the last stage answers in order), random early stops;
    with room kept for growth (`reserve`), and at a full reserve no sequence is preempted."""
    config, pp, requests = workload
    sched = scheduler_for(
        config,
        max_running_seqs=pp * config["max_num_seqs"],
        micro_batches=pp,
        lookahead=True,
        reserve=reserve,
    )
    chains: dict[int, int] = {}  # chained plan -> the plan it chains

    def check(seqs, plans):
        assert all(s.in_flight <= 2 for s in seqs)
        out = {p.step_id for p in plans}
        for plan in plans:
            if plan.chains is not None and plan.step_id not in chains:
                assert plan.chains in out  # its source was in flight when it was made
                chains[plan.step_id] = plan.chains
        assert len(set(chains.values())) == len(chains)  # a plan is chained at most once

    finished, aborted = simulate(
        sched,
        config,
        requests,
        in_flight=2 * pp,
        next_reply=lambda plans: 0,
        ends=lambda seq: seq.num_output_tokens == seq.max_tokens or rng.random() < 0.1,
        check=check,
    )
    assert_outputs_as_sampled(requests, finished, aborted)
    if reserve == 1.0:
        assert sched.num_preemptions == 0


def test_lookahead_fills_free_micro_batches_before_chaining():
    sched = Scheduler(256, 4, max_num_seqs=8, max_running_seqs=16, micro_batches=2, lookahead=True)
    for i in range(4):
        sched.add(make_seq(i, 5, max_tokens=8))
    a, b = sched.schedule(), sched.schedule()  # both micro-batches before any chaining
    assert [len(a.seqs), len(b.seqs)] == [2, 2] and a.chains is b.chains is None
    a2, b2 = sched.schedule(), sched.schedule()  # then each one's next step, in order
    assert (a2.chains, b2.chains) == (a.step_id, b.step_id)
    assert shares(a2) == [(0, 1), (1, 1)] and all(s.chained for s in a2.seqs + b2.seqs)
    assert sched.schedule() is None  # every sequence has two steps out
    assert sched.oldest_in_flight == a.step_id
    sched.complete(a, sample_all(a))
    assert sched.oldest_in_flight == b.step_id
    a3 = sched.schedule()  # a's next step chains a2, the oldest plan not chained yet
    assert a3.chains == a2.step_id and shares(a3) == [(0, 1), (1, 1)]
    # (the Engine keeps two plans a micro-batch out: 4 now) a request arriving meanwhile joins
    # the next micro-batch's next step
    sched.add(make_seq(9, 3))
    sched.complete(b, sample_all(b))
    b3 = sched.schedule()
    assert b3.chains == b2.step_id and shares(b3) == [(2, 1), (3, 1), (9, 3)]


def test_lookahead_chains_a_lone_request_although_a_micro_batch_is_free():
    sched = Scheduler(64, 4, max_num_seqs=8, micro_batches=4, lookahead=True)
    sched.add(make_seq(0, 5, max_tokens=8))
    first = sched.schedule()
    second = sched.schedule()  # nothing else could fill the three free micro-batches
    assert second.chains == first.step_id and second.seqs[0].chained


def assert_outputs_as_sampled(requests, finished: dict, aborted: set) -> None:
    """Every request not aborted got `expected_token` at each position it generated (it may
    have stopped early)."""
    for seq_id, prompt_len, _, _, _ in requests:
        if seq_id not in aborted:
            out = finished[seq_id]
            positions = range(prompt_len, prompt_len + len(out))
            assert out == [expected_token(seq_id, p) for p in positions]


def test_lookahead_plan_chains_the_last_plans_samples():
    sched = Scheduler(64, 4, max_num_seqs=8, max_batch_tokens=64, lookahead=True)
    sched.add(make_seq(0, 5, max_tokens=4))
    sched.add(make_seq(1, 3, max_tokens=1))
    first = sched.schedule()
    assert shares(first) == [(0, 5), (1, 3)] and first.chains is None
    sched.add(make_seq(2, 6))
    second = sched.schedule()  # the first is still in flight
    assert second.chains == first.step_id
    # 0 and 1 decode the tokens the first step samples; 1's would be its last: not chained
    assert shares(second) == [(0, 1), (2, 6)]
    chained = second.seqs[0]
    assert chained.chained and chained.chain_row == 0 and chained.token_ids == []
    assert (chained.start, chained.context_len, chained.sample) == (5, 6, True)
    assert len(chained.block_table) == 2  # position 5 opens block 1
    assert sched.get(0).in_flight == 2
    with pytest.raises(ValueError, match="before the step it chains"):
        sched.complete(second, sample_all(second))
    assert [s.seq_id for s in sched.complete(first, {0: 10, 1: 11})] == [0, 1]
    sched.finish(1)
    assert [s.seq_id for s in sched.complete(second, {0: 12, 2: 13})] == [0, 2]
    assert sched.get(0).output_token_ids == [10, 12]
    assert sched.get(0).num_computed_tokens == 6 and not sched.get(0).in_flight


def test_lookahead_finish_while_chained_frees_after_the_chained_step():
    sched = Scheduler(8, 4, max_num_seqs=8, max_batch_tokens=64, lookahead=True)
    sched.add(make_seq(0, 4, max_tokens=8))
    first = sched.schedule()
    second = sched.schedule()
    assert second.seqs[0].chained and sched.blocks.num_used_blocks == 2
    sched.complete(first, {0: 1})
    sched.finish(0)  # a stop token: the chained step is still running on the workers
    assert sched.blocks.num_used_blocks == 2  # they may still write its blocks
    assert sched.complete(second, {}) == []  # its token is ignored
    assert sched.blocks.num_used_blocks == 0 and not sched.has_unfinished()


def test_without_lookahead_a_plan_in_flight_is_not_chained():
    sched = Scheduler(64, 4, max_num_seqs=8, max_batch_tokens=64)
    sched.add(make_seq(0, 5))
    sched.schedule()
    assert sched.schedule() is None


def test_a_burst_is_shared_evenly_between_micro_batches():
    sched = Scheduler(4096, 4, max_num_seqs=64, max_running_seqs=4 * 64, micro_batches=4)
    for i in range(64):
        sched.add(make_seq(i, 5))
    plans = [sched.schedule() for _ in range(4)]
    assert [len(p.seqs) for p in plans] == [16, 16, 16, 16]
    ids = [s.seq_id for p in plans for s in p.seqs]
    assert sorted(ids) == list(range(64))  # disjoint, and nobody left out
    assert sched.schedule() is None  # every sequence is in flight
    # as sequences finish, each step's share shrinks with them
    for p in plans:
        for seq in sched.complete(p, sample_all(p)):
            if seq.seq_id < 32:
                sched.finish(seq.seq_id)
    assert [len(sched.schedule().seqs) for _ in range(4)] == [8, 8, 8, 8]


@pytest.mark.parametrize(
    "burst, micro_batches, shares",
    [(4, 3, [2, 1, 1]), (10, 4, [3, 3, 2, 2]), (2, 4, [1, 1]), (9, 3, [3, 3, 3])],
)
def test_a_small_burst_still_fills_every_free_micro_batch(burst, micro_batches, shares):
    sched = Scheduler(4096, 4, max_num_seqs=64, micro_batches=micro_batches)
    for i in range(burst):
        sched.add(make_seq(i, 5))
    plans = iter(sched.schedule, None)
    assert [len(p.seqs) for p in plans] == shares


def test_one_micro_batch_takes_every_sequence_it_can():
    sched = Scheduler(4096, 4, max_num_seqs=64)
    for i in range(40):
        sched.add(make_seq(i, 5))
    assert len(sched.schedule().seqs) == 40
    with pytest.raises(InvalidRequest) as info:
        Scheduler(16, 4, micro_batches=0)
    assert info.value.field == "micro_batches"


# ---- room for growth when admitting (reserve) -------------------------------------------------


@pytest.mark.parametrize(("reserve", "admitted"), [(0.0, 5), (0.5, 4), (1.0, 3)])
def test_reserve_keeps_a_share_of_the_running_sequences_growth_free(reserve, admitted):
    # 8-token prompts take 2 blocks of 4; with max_tokens 5 each grows to 12 cached tokens, 3
    # blocks. Of 10 blocks, 1.0 admits while own 2 + every admitted one's 1 to come fit:
    # 2 + 1, 2 + 2, 2 + 3 of 10, 8, 6 free; the fourth (2 + 4 > 4) waits. 0.5 keeps half of it
    # (rounded up): 3, 3, 4, 4 of 10, 8, 6, 4; the fifth (2 + 3 > 2) waits. 0 fills the cache.
    sched = Scheduler(10, 4, max_batch_tokens=100, reserve=reserve)
    for i in range(6):
        sched.add(make_seq(i, 8, max_tokens=5))
    assert [seq_id for seq_id, _ in shares(sched.schedule())] == list(range(admitted))


@pytest.mark.parametrize("reserve", [-0.1, 1.5, "half", True, None])
def test_reserve_outside_zero_to_one_is_refused_naming_it(reserve):
    with pytest.raises(InvalidRequest) as err:
        Scheduler(16, 4, reserve=reserve)
    assert err.value.field == "reserve"


def test_room_is_what_add_accepts_for_a_prompt():
    for max_model_len in (None, 30, 100):
        sched = Scheduler(num_blocks=4, block_size=8, max_model_len=max_model_len)  # 32 tokens
        for prompt in (1, 10, 29):
            room = sched.room(prompt)
            sched.add(Sequence(prompt, [1] * prompt, room))  # the most it accepts...
            with pytest.raises(InvalidRequest):
                sched.add(
                    Sequence(1000 + prompt, [1] * prompt, room + 1)
                )  # ...and one more it refuses
