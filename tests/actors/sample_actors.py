"""Actor classes the actor tests host in their workers (importable by path in a spawned process)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

from energon.actors import actor_context


def mapping_of(address: int) -> str:
    """The path of this process's memory mapping that holds address ("" if anonymous / none)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else ""
    return ""


def digest(t) -> str:
    """sha256 of a tensor's dtype, shape and values (row-major bytes)."""
    import torch

    raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode() + raw).hexdigest()


class Echo:
    """Returns what it gets; records order; sleeps and raises on request."""

    def __init__(self, tag: str = "", *, scale: int = 1):
        self.tag = tag
        self.scale = scale
        self.records: list = []
        self.held: list = []
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

    def digest(self, t):
        """What arrived, as a digest, and which mapping it views."""
        return {"digest": digest(t), "mapping": mapping_of(t.data_ptr())}

    def random_tensor(self, dtype: str, shape: list, seed: int):
        import torch

        return random_bits(getattr(torch, dtype), shape, seed)

    def hold(self, t):
        self.held.append(t)
        return None

    def held_digests(self):
        return [digest(t) for t in self.held]

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


def random_bits(dtype, shape, seed: int):
    """A tensor of arbitrary bit patterns (NaNs included) of dtype and shape."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape) * dtype.itemsize
    bits = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    if dtype == torch.bool:
        bits &= 1  # a bool byte other than 0/1 is not a value torch keeps through a copy
    return bits.view(dtype).reshape(shape)


class Later:
    """Sync methods whose results are `Deferred`: `launch(i)` returns a result that is ready
    only once `launch(i + 1)` has started (or after `patience` seconds, recorded as a stall) —
    what a GPU step looks like when the worker queues the next step behind it."""

    def __init__(self, patience: float = 5.0):
        import threading

        self.patience = patience
        self.started: dict[int, threading.Event] = {}
        self.stalls: list[int] = []
        self.order: list[str] = []

    def _event(self, i: int):
        import threading

        return self.started.setdefault(i, threading.Event())

    def launch(self, i: int, last: bool = False):
        from energon.actors import Deferred

        self.order.append(f"start {i}")
        self._event(i).set()

        def wait():
            if not last and not self._event(i + 1).wait(self.patience):
                self.stalls.append(i)

        def result():
            self.order.append(f"reply {i}")
            return i

        return Deferred(result, wait)

    def failing(self, where: str):
        from energon.actors import Deferred

        def boom():
            raise ValueError(f"failed in {where}")

        if where == "wait":
            return Deferred(lambda: "unreachable", boom)
        return Deferred(boom)

    def now(self, value):
        self.order.append(f"now {value}")
        return value

    def pause(self, name: str, seconds: float):
        """A call that keeps the worker's sync thread busy (a step blocked on its device)."""
        import time

        self.order.append(f"pause {name}")
        time.sleep(seconds)
        return name

    def log(self):
        return {"order": list(self.order), "stalls": list(self.stalls)}
