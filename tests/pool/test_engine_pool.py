"""An Engine whose stages pool some layers' weights (host memory lent by the other worker)
computes exactly what the resident Engine computes."""

from __future__ import annotations

import logging

import pytest
import torch

from energon import Engine, SamplingParams
from energon.pool.offload import layer_bytes
from energon.runner import ModelRunner
from pool.pool_actors import make_checkpoint

pytestmark = pytest.mark.timeout(90)
PROMPTS = [[1, 2, 3, 4, 5, 6], [9, 8, 7], [100, 200]]


async def run(folder: str, device: str = "cpu", **pool) -> tuple[list, list, int]:
    """(forward logits, greedy tokens, active leases) of an Engine with pp=2 on `device`."""
    async with Engine(
        folder,
        pp=2,
        device=device,
        kv_cache_memory="64MiB",
        dtype="float32",
        worker_env={"OMP_NUM_THREADS": "1"},
        progress=False,
        **pool,
    ) as engine:
        logits = await engine.forward(PROMPTS)
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        tokens = [(await engine.infer(p, params)).token_ids for p in PROMPTS]
        leases = engine.pool.stats()["leases"] if engine.pool is not None else 0
    return logits, tokens, leases


async def test_pooled_engine_equals_the_resident_engine(tmp_path, caplog):
    folder = str(make_checkpoint(tmp_path / "tiny8", layers=8))
    size = layer_bytes(ModelRunner(folder, rank=0).model.layers[0])
    budget = 70_000 + 3 * size  # each stage: its embedding or head, one layer, two buffers
    with caplog.at_level(logging.INFO, logger="energon"):
        pooled_logits, pooled_tokens, leases = await run(
            folder, pool="host", gpu_memory_budget=budget
        )
    resident_logits, resident_tokens, none = await run(folder, pool=None)
    assert (leases, none) == (6, 0)  # three layers of each stage
    assert all(torch.equal(a, b) for a, b in zip(pooled_logits, resident_logits, strict=True))
    assert pooled_tokens == resident_tokens
    lines = sorted(r.getMessage() for r in caplog.records if "resident on" in r.getMessage())
    assert "worker 0: layers 1 resident on cpu; layers 0, 2, 3 in host (worker 1)" in lines[0]
    assert "worker 1: layers 5 resident on cpu; layers 4, 6, 7 in host (worker 0)" in lines[1]
    assert all("ms per step" in line for line in lines)
