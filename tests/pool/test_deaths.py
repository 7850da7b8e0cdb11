"""Leases when a worker is SIGKILLed: the lender's death revokes, the borrower's frees."""

from __future__ import annotations

import os
import signal

import pytest

from energon.actors import ActorGroup
from energon.errors import RemoteError
from energon.pool.allocator import Pool
from pool.conftest import eventually
from pool.pool_actors import mapped_segments

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


@pytest.fixture
async def group():
    g = await ActorGroup.spawn("pool.pool_actors:PoolActor", 2, env={"OMP_NUM_THREADS": "1"})
    yield g
    await g.shutdown()


async def test_lender_death_revokes_the_lease_in_the_borrower(group):
    pool = Pool(group, "host")
    lease = await pool.borrow(MiB, near=0)
    os.kill((await group[1].call("pid")), signal.SIGKILL)
    await group.wait_failed()
    await pool.settle()
    assert lease.state == "revoked"
    state = await group[0].call("pool_state")
    assert state == {"lent": {}, "borrowed": {}, "revoked": [lease.id]}
    with pytest.raises(RemoteError, match="revoked") as err:
        await group[0].call("read", lease.id, 0, 1)
    assert err.value.remote_type.endswith("LeaseRevoked")
    assert mapped_segments(await group[0].call("pid")) == []


async def test_borrower_death_makes_the_lender_free(group):
    pool = Pool(group, "host")
    lease = await pool.borrow(MiB, near=0)
    lender_pid = await group[1].call("pid")
    os.kill((await group[0].call("pid")), signal.SIGKILL)
    await group.wait_failed()
    await pool.settle()
    assert lease.state == "freed"
    assert await group[1].call("pool_state") == {"lent": {}, "borrowed": {}, "revoked": []}
    assert await eventually(lambda: mapped_segments(lender_pid) == [])
