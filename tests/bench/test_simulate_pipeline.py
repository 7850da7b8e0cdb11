"""The pipeline simulator (bench/simulate_pipeline.py) drives the real Scheduler to the end."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "bench" / "simulate_pipeline.py"


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("simulate_pipeline", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def args(**kw):
    base = dict(requests=24, prompt_len=64, gen_len=8, max_batch_tokens=512, balanced=False)
    base.update(turnaround=0.01, **kw)
    return argparse.Namespace(**base)


def test_every_request_runs_to_its_length_and_micro_batches_overlap_the_stages(sim):
    one = sim.simulate(1, 1, 4e9, args())
    blocking = sim.simulate(2, 1, 4e9, args())
    three = sim.simulate(2, 3, 4e9, args())
    for r in (one, blocking, three):
        assert r["rate"] * r["wall"] == pytest.approx(24 * 8)  # every token, once
        assert all(0 < b <= 1 for b in r["busy"])
    assert sum(blocking["busy"]) <= 1  # one step in flight: the stages take turns
    assert three["rate"] > blocking["rate"] and min(three["busy"]) > max(blocking["busy"])


def test_a_stage_step_costs_its_weights_or_its_flops_whichever_is_slower(sim):
    from energon.scheduler import Scheduler
    from energon.sequence import Sequence

    sched = Scheduler(512, 16, max_num_seqs=4, max_batch_tokens=4096, max_model_len=4096)
    sched.add(Sequence(0, [1] * 4000, 4))
    prefill = sched.schedule()
    t = sim.stage_seconds(prefill, 1, last=False) - sim.STEP_COST
    flops = 2 * sim.LAYER_PARAMS * sim.LAYERS * 4000
    assert t >= flops / (sim.MATMUL * sim.MATMUL_EFF)  # compute-bound: at least the matmuls


def test_lookahead_chains_each_micro_batch_past_the_controllers_turnaround(sim):
    """With lookahead a micro-batch's next step waits for its last one on the last stage, not
    for the controller: at a long turnaround (10 ms), pp micro-batches chained beat the same
    unchained."""
    plain = sim.simulate(2, 2, 4e9, args())
    chained = sim.simulate(2, 2, 4e9, args(lookahead=True))
    for r in (plain, chained):
        assert r["rate"] * r["wall"] == pytest.approx(24 * 8)  # every token, once
    assert chained["rate"] > 1.3 * plain["rate"]
    assert min(chained["busy"]) > max(plain["busy"])


def test_a_spread_head_moves_a_share_of_its_bytes_from_the_last_stage_to_every_stage(sim):
    from energon.scheduler import Scheduler
    from energon.sequence import Sequence

    sched = Scheduler(512, 16, max_num_seqs=64, max_batch_tokens=64, max_model_len=4096)
    for i in range(64):
        sched.add(Sequence(i, [1], 4))
    decode = sched.schedule()  # 64 one-token rows, each sampling: bandwidth-bound
    head_s = 2 * sim.VOCAB * sim.HIDDEN / (sim.BANDWIDTH * sim.BANDWIDTH_EFF)
    middle = sim.stage_seconds(decode, 4, last=False)
    last = sim.stage_seconds(decode, 4, last=True)
    assert last - middle == pytest.approx(head_s)
    for is_last in (False, True):
        spread = sim.stage_seconds(decode, 4, last=is_last, head="spread")
        assert spread - middle == pytest.approx(head_s / 4)
