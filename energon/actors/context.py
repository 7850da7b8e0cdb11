"""What an actor can learn about where it runs: actor_context() inside a worker process."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ActorContext:
    """This worker's place in its group."""

    rank: int
    world_size: int
    controller_address: str


_current: ActorContext | None = None


def actor_context() -> ActorContext:
    """Returns this worker's ActorContext; raises RuntimeError outside a worker process."""
    if _current is None:
        raise RuntimeError("actor_context() is only available inside an energon actor worker")
    return _current


def _set_current(ctx: ActorContext | None) -> None:
    global _current
    _current = ctx
