"""Bringing a group's workers up: each connects both its channels (a hello on each), then is sent
init (the actor to build and, where shared memory can be had, the segments to open) and answers
ready (its methods, and whether it opened the segments)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from energon.actors import shm
from energon.errors import WorkerFailed


def target_name(actor: type | str) -> str:
    """ "module:Qualified.Name" of an actor class (or the name itself); raises TypeError."""
    if isinstance(actor, str):
        return actor
    if not isinstance(actor, type):
        raise TypeError(f"actor must be a class or 'module:Class' (got {type(actor).__name__})")
    return f"{actor.__module__}:{actor.__qualname__}"


class Startup:
    """Which ranks have joined (both channels said hello), and the init/ready exchange."""

    def __init__(self, loop: asyncio.AbstractEventLoop, world_size: int, address: str):
        self.world_size = world_size
        self.address = address
        self.channels: list[set[str]] = [set() for _ in range(world_size)]
        self.joined = [loop.create_future() for _ in range(world_size)]

    def on_hello(self, rank: int, channel: str, meta: dict) -> bool:
        """Records rank's channel as connected; False if the hello is inconsistent or repeated."""
        if meta["rank"] != rank or meta["channel"] != channel or channel in self.channels[rank]:
            return False
        self.channels[rank].add(channel)
        if len(self.channels[rank]) == 2 and not self.joined[rank].done():
            self.joined[rank].set_result(None)
        return True

    async def run(
        self,
        request: Callable[[int, dict], Awaitable[dict]],
        init_meta: dict,
        timeout: float,
        shm_segment_bytes: int,
        shm_min_bytes: int,
    ) -> tuple[dict[str, bool], list[shm.Link | None]]:
        """Waits up to timeout for every rank to join, then sends each init_meta (plus its
        shared-memory offer) through request(rank, meta) and awaits ready.

        Returns (method name -> is async, each rank's shm.Link or None). Raises WorkerFailed
        naming the ranks that did not join, or whatever a rank's init raised.
        """
        _, pending = await asyncio.wait(
            self.joined, timeout=timeout, return_when=asyncio.FIRST_EXCEPTION
        )
        for joined in self.joined:
            if joined.done() and joined.exception() is not None:
                raise joined.exception()
        if pending:
            missing = [r for r, f in enumerate(self.joined) if not f.done()]
            raise WorkerFailed(
                missing[0], f"ranks {missing} did not connect to {self.address} within {timeout}s"
            )
        offers: list[shm.Offer | None] = [None] * self.world_size
        try:
            for rank in range(self.world_size):
                if shm_segment_bytes > 0:
                    try:
                        offers[rank] = shm.Offer(shm_segment_bytes, rank, shm_min_bytes)
                    except OSError:  # no memfd here: frames only
                        pass
            ready = await asyncio.gather(
                *(
                    request(rank, dict(init_meta, shm=offer and offer.meta()))
                    for rank, offer in enumerate(offers)
                )
            )
        finally:
            for offer in offers:
                if offer is not None:
                    offer.close()  # the worker has opened them by now, or never will
        links = [
            offer.accepted() if offer is not None and r["shm"] else None
            for offer, r in zip(offers, ready, strict=True)
        ]
        return ready[0]["methods"], links
