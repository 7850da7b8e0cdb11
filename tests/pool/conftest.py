"""Pool tests: leftover shared-memory segments are a failure of the test that left them."""

from __future__ import annotations

import pytest
from actors.conftest import eventually  # noqa: F401 (test_deaths imports it from here)

from pool.pool_actors import shm_names


@pytest.fixture(autouse=True)
def no_leftover_segments():
    before = set(shm_names())
    yield
    left = set(shm_names()) - before
    assert not left, f"shared-memory segments left behind: {sorted(left)}"
