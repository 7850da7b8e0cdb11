"""Pooled weights, in one process: which layers are pooled, the copy schedule, and outputs
exactly equal to the resident model (the same bytes reach the same kernels)."""

from __future__ import annotations

import pytest
import torch

from energon.errors import InvalidRequest
from energon.pool.messages import LeaseRevoked
from energon.pool.offload import choose_offloaded
from energon.runner import ModelRunner
from pool.pool_actors import make_checkpoint

pytestmark = pytest.mark.timeout(60)
SEQS = [[1, 2, 3, 4, 5], [7, 8, 9], [200]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny8", layers=8))


@pytest.fixture(scope="module")
def resident(checkpoint):
    return ModelRunner(checkpoint, rank=0)


def pooled_runner(checkpoint, budget: int, buffers: int = 2) -> ModelRunner:
    """A runner whose pooled layers' regions are plain cpu tensors (what a lease maps)."""
    runner = ModelRunner(
        checkpoint, rank=0, pool={"mode": "host", "budget": budget, "buffers": buffers}
    )
    if runner.offload is not None:
        runner.offload.trace = []
        runner.offload.attach([torch.zeros(n, dtype=torch.uint8) for n in runner.pool_needs()])
    return runner


def layer_size(runner) -> int:
    return runner.offload.sizes[0]


# -- which layers ---------------------------------------------------------------------------


def test_nothing_is_pooled_when_the_weights_fit():
    assert choose_offloaded({0: 100, 1: 100}, fixed=50, budget=250) == []


def test_the_fewest_layers_are_pooled_spread_through_the_stage():
    sizes = dict.fromkeys(range(8), 100)
    # 50 + 800 = 850; pooling n layers costs 2 buffers (200): n=4 -> 50 + 400 + 200 = 650
    assert choose_offloaded(sizes, fixed=50, budget=650) == [1, 3, 5, 7]
    assert choose_offloaded(sizes, fixed=50, budget=750) == [1, 4, 6]  # 50 + 500 + 200


def test_a_budget_below_fixed_weights_plus_buffers_names_what_it_needs():
    with pytest.raises(
        InvalidRequest, match="gpu_memory_budget is too small.*needs at least 250 B"
    ):
        choose_offloaded({0: 100, 1: 100, 2: 100}, fixed=50, budget=249)


# -- the schedule ---------------------------------------------------------------------------


def test_each_copy_precedes_its_layer_and_follows_the_buffers_last_reader(checkpoint, resident):
    assert pooled_runner(checkpoint, budget=10**9).offload is None
    size = _staged_size(checkpoint)
    fixed = resident.memory()["param_bytes"] - 8 * _layer_param_bytes(resident)
    runner = pooled_runner(checkpoint, budget=fixed + 4 * size + 2 * size)
    stage = runner.offload
    assert stage.indices == [1, 3, 5, 7]
    for _ in range(3):
        runner.forward(SEQS)
    # replay the trace against two buffers: a layer runs only from a buffer holding it, and a
    # copy never overwrites a layer that has not run since it was copied in
    holds, consumed = {}, {}
    for kind, layer in stage.trace:
        b = stage.indices.index(layer) % 2
        if kind == "copy":
            assert consumed.get(b, True), f"copy of {layer} overwrote an unread buffer"
            holds[b], consumed[b] = layer, False
        else:
            assert holds.get(b) == layer, f"layer {layer} ran before its copy"
            consumed[b] = True
    runs = [layer for kind, layer in stage.trace if kind == "run"]
    copies = [layer for kind, layer in stage.trace if kind == "copy"]
    assert runs == [1, 3, 5, 7] * 3
    assert len(copies) == 2 + 4 * 3  # the first two, then every pooled layer once a step
    # and each copy is issued two pooled layers ahead: right after the buffer's last reader
    assert stage.trace[:4] == [("copy", 1), ("copy", 3), ("run", 1), ("copy", 5)]


def _layer_param_bytes(runner) -> int:
    return sum(p.numel() * p.element_size() for p in runner.model.layers[0].parameters())


def _staged_size(checkpoint) -> int:
    from energon.pool.offload import layer_bytes

    return layer_bytes(ModelRunner(checkpoint, rank=0).model.layers[0])


# -- outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(("pooled", "buffers"), [(3, 2), (5, 2), (8, 2), (8, 3)])
def test_forward_equals_the_resident_model(checkpoint, resident, pooled, buffers):
    size = _staged_size(checkpoint)
    fixed = resident.memory()["param_bytes"] - 8 * _layer_param_bytes(resident)
    runner = pooled_runner(checkpoint, fixed + (8 - pooled) * size + buffers * size, buffers)
    assert len(runner.offload.indices) == pooled
    expected = resident.forward(SEQS)
    for _ in range(3):
        assert torch.equal(runner.forward(SEQS), expected)


def test_cached_decode_steps_equal_the_resident_model(checkpoint, resident):
    size = _staged_size(checkpoint)
    fixed = resident.memory()["param_bytes"] - 8 * _layer_param_bytes(resident)
    runner = pooled_runner(checkpoint, fixed + 3 * size + 2 * size)
    outs = []
    for r in (resident, runner):
        r.init_kv_cache(8, 4)
        prefill = {
            "input_ids": [5, 6, 7, 8, 9],
            "query_lens": [5],
            "context_lens": [5],
            "block_tables": [[0, 1]],
            "logits_indices": "last",
        }
        steps = [r.execute(prefill)]
        for t in range(3):
            steps.append(
                r.execute(
                    {
                        "input_ids": [10 + t],
                        "query_lens": [1],
                        "context_lens": [6 + t],
                        "block_tables": [[0, 1]],
                    }
                )
            )
        outs.append(torch.cat(steps))
    assert torch.equal(outs[0], outs[1])


def test_a_revoked_stage_raises_lease_revoked(checkpoint, resident):
    size = _staged_size(checkpoint)
    fixed = resident.memory()["param_bytes"] - 8 * _layer_param_bytes(resident)
    runner = pooled_runner(checkpoint, fixed + 3 * size + 2 * size)
    runner.offload.revoke()
    with pytest.raises(LeaseRevoked, match="lender died"):
        runner.forward(SEQS)
