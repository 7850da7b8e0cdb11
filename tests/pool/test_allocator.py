"""The pool protocol between real worker processes with shared-memory lenders: borrow, map,
write/read from both sides, free, exhaustion, close (deaths: test_deaths.py)."""

from __future__ import annotations

import pytest
import pytest_asyncio

from energon.actors import ActorGroup
from energon.errors import PoolExhausted
from energon.pool.allocator import Pool
from pool.pool_actors import mapped_segments

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


async def spawn() -> ActorGroup:
    return await ActorGroup.spawn("pool.pool_actors:PoolActor", 2, env={"OMP_NUM_THREADS": "1"})


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared():
    """Two workers for the tests that leave both alive (each returns every lease it took)."""
    g = await spawn()
    yield g
    await g.shutdown()


@pytest.mark.asyncio(loop_scope="module")
async def test_borrowed_region_is_shared_with_its_lender(shared):
    group = shared
    pool = Pool(group, "host")
    lease = await pool.borrow(MiB, near=0)
    assert (lease.lender, lease.borrower, lease.kind, lease.state) == (1, 0, "shm", "mapped")
    await group[0].call("write", lease.id, 4096, b"from the borrower")
    assert await group[1].call("read", lease.id, 4096, 17) == b"from the borrower"
    await group[1].call("write", lease.id, MiB - 5, b"lend!")
    assert await group[0].call("read", lease.id, MiB - 5, 5) == b"lend!"
    await pool.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_free_unmaps_in_both_workers_and_leaves_no_segment(shared):
    group = shared
    pool = Pool(group, "host")
    lease = await pool.borrow(2 * MiB, near=1)
    pids = await group.broadcast("pid")
    assert all(mapped_segments(pid) for pid in pids)  # both map it (the name is already gone)
    await pool.free(lease)
    assert lease.state == "freed"
    assert [await group[r].call("pool_state") for r in (0, 1)] == [
        {"lent": {}, "borrowed": {}, "revoked": []}
    ] * 2
    assert [mapped_segments(pid) for pid in pids] == [[], []]
    assert pool.stats()["lent_bytes"] == 0


@pytest.mark.asyncio(loop_scope="module")
async def test_exhaustion_names_what_was_asked_and_what_was_free(shared):
    group = shared
    pool = Pool(group, "host", host_budget=3 * MiB)
    await pool.borrow(2 * MiB, near=0)
    with pytest.raises(
        PoolExhausted,
        match=r"cannot lend 2\.0 MiB \(2097152 bytes\) to worker 1: free host:\S+ 1\.0 MiB",
    ):
        await pool.borrow(2 * MiB, near=1)
    await pool.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_peer_mode_without_gpus_has_nothing_to_lend(shared):
    group = shared
    pool = Pool(group, "peer")
    with pytest.raises(PoolExhausted, match="mode 'peer'"):
        await pool.borrow(MiB, near=0)


@pytest.mark.asyncio(loop_scope="module")
async def test_close_returns_every_lease(shared):
    group = shared
    pool = Pool(group, "host")
    leases = [await pool.borrow(MiB, near=r) for r in (0, 1, 0)]
    assert {x.lender for x in leases} == {0, 1}
    await pool.close()
    assert [x.state for x in leases] == ["freed"] * 3
    for rank in (0, 1):
        assert await group[rank].call("pool_state") == {"lent": {}, "borrowed": {}, "revoked": []}
