"""Actor classes the actor tests host in their workers (importable by path in a spawned process)."""

from __future__ import annotations

import asyncio
import os
import time

from energon.actors import actor_context


class Echo:
    """Returns what it gets; records order; sleeps and raises on request."""

    def __init__(self, tag: str = "", *, scale: int = 1):
        self.tag = tag
        self.scale = scale
        self.records: list = []
        self.cancelled = 0
        self._cancel_seen = asyncio.Event()

    def ping(self):
        return None

    def echo(self, value):
        return value

    def echo_kwargs(self, *args, **kwargs):
        return {"args": list(args), "kwargs": kwargs}

    def init_args(self):
        return {"tag": self.tag, "scale": self.scale}

    def whoami(self):
        ctx = actor_context()
        return {"rank": ctx.rank, "world_size": ctx.world_size, "address": ctx.controller_address}

    def pid(self):
        return os.getpid()

    def getenv(self, name):
        return os.environ.get(name)

    def record(self, item):
        self.records.append(item)
        return item

    def recorded(self):
        return list(self.records)

    def sleep(self, seconds, result=None):
        time.sleep(seconds)
        return result

    def boom(self, message):
        raise ValueError(message)

    def unsendable(self):
        return object()

    def exit_now(self, code):
        os._exit(code)

    def _private(self):
        return "secret"

    async def aecho(self, value, delay=0.0):
        await asyncio.sleep(delay)
        return value

    async def aboom(self, message):
        await asyncio.sleep(0)
        raise KeyError(message)

    async def wait_forever(self):
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            self._cancel_seen.set()
            raise

    async def cancellations(self, at_least: int, timeout: float):
        """The number of cancelled wait_forever calls, once it reaches at_least (or timeout)."""
        try:
            await asyncio.wait_for(self._wait_cancelled(at_least), timeout)
        except asyncio.TimeoutError:
            pass
        return self.cancelled

    async def _wait_cancelled(self, at_least):
        while self.cancelled < at_least:
            self._cancel_seen.clear()
            await self._cancel_seen.wait()


class FailsToStart:
    def __init__(self, message):
        raise RuntimeError(message)
