"""Pool tests: leftover shared-memory segments are a failure of the test that left them."""

from __future__ import annotations

import asyncio
import time

import pytest

from pool.pool_actors import shm_names


async def eventually(predicate, timeout: float = 5.0) -> bool:
    """Polls predicate (state of other processes, which sends no event) until true or timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@pytest.fixture(autouse=True)
def no_leftover_segments():
    before = set(shm_names())
    yield
    left = set(shm_names()) - before
    assert not left, f"shared-memory segments left behind: {sorted(left)}"
