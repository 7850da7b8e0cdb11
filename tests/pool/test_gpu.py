"""The pool on two GPUs: CUDA IPC leases between workers (checked with the device's memory
counter) and generation with weights pooled in the peer GPU, equal to the resident Engine."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from energon.actors import ActorGroup
from energon.pool.allocator import Pool
from energon.pool.offload import layer_bytes
from energon.runner import ModelRunner
from pool.pool_actors import make_checkpoint
from pool.test_engine_pool import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
    pytest.mark.timeout(180),
]
MiB = 1 << 20
ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@pytest.fixture
async def group():
    g = await ActorGroup.spawn("pool.pool_actors:PoolActor", 2, args=("cuda",), env=ENV)
    yield g
    await g.shutdown()


async def warm_pool(group, mode: str) -> Pool:
    """A pool whose borrower (rank 0) has already opened a lease of rank 1's GPU once, so the
    CUDA context it needs there exists before the lender's counter is read."""
    pool = Pool(group, mode)
    await pool.free(await pool.borrow(2 * MiB, near=0))
    return pool


async def test_cuda_ipc_lease_is_shared_and_its_memory_comes_back(group):
    pool = await warm_pool(group, "peer")
    before = await group[1].call("device_free")
    lease = await pool.borrow(256 * MiB, near=0)
    assert (lease.lender, lease.kind, lease.where) == (1, "cuda", "rank1:cuda:1")
    assert before - await group[1].call("device_free") >= 256 * MiB
    await group[0].call("write", lease.id, 12345, b"written by worker 0")
    assert await group[1].call("read", lease.id, 12345, 19) == b"written by worker 0"
    await group[1].call("write", lease.id, 256 * MiB - 3, b"end")
    assert await group[0].call("read", lease.id, 256 * MiB - 3, 3) == b"end"
    await pool.free(lease)
    assert abs(await group[1].call("device_free") - before) <= 2 * MiB


async def test_borrower_death_frees_the_lenders_gpu_memory(group):
    pool = await warm_pool(group, "peer")
    before = await group[1].call("device_free")
    lease = await pool.borrow(256 * MiB, near=0)
    os.kill(await group[0].call("pid"), signal.SIGKILL)
    await group.wait_failed()
    await pool.settle()
    assert lease.state == "freed"
    assert await group[1].call("pool_state") == {"lent": {}, "borrowed": {}, "revoked": []}
    # the dead borrower's own context on this GPU goes too: at least as much is free as before
    assert await group[1].call("device_free") >= before - 2 * MiB


async def test_host_lease_for_a_cuda_borrower_is_pinned_shared_memory(group):
    pool = Pool(group, "host")
    lease = await pool.borrow(8 * MiB, near=0)
    assert lease.kind == "shm"
    await group[0].call("write", lease.id, 0, b"pinned")
    assert await group[1].call("read", lease.id, 0, 6) == b"pinned"
    await pool.close()
    assert lease.state == "freed"


async def test_generation_with_weights_in_the_peer_gpu_equals_resident(tmp_path):
    folder = str(make_checkpoint(tmp_path / "tiny8", layers=8))
    size = layer_bytes(ModelRunner(folder, rank=0).model.layers[0])
    pooled = await run(folder, "cuda", pool="peer", gpu_memory_budget=70_000 + 3 * size)
    resident = await run(folder, "cuda", pool=None)
    assert (pooled[2], resident[2]) == (6, 0)
    assert all(torch.equal(a, b) for a, b in zip(pooled[0], resident[0], strict=True))
    assert pooled[1] == resident[1]
