"""Actor tests: modules that set BOTH_LOOPS = True run under the default asyncio loop and uvloop."""

from __future__ import annotations

import asyncio
import time

import uvloop


def pytest_asyncio_loop_factories(config, item):
    if getattr(item.module, "BOTH_LOOPS", False):
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def process_gone(pid: int) -> bool:
    """True if pid no longer runs (absent, or a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def eventually(predicate, timeout: float = 5.0) -> bool:
    """Polls predicate (state of other processes, which sends no event) until true or timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
