"""What a caller holds: an ActorHandle per worker, and a CallFuture per call."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from energon.actors.controller import ActorGroup


class ActorHandle:
    """One worker of a group: `await handle.call("method", *args, **kwargs)`."""

    __slots__ = ("group", "rank")

    def __init__(self, group: ActorGroup, rank: int):
        self.group = group
        self.rank = rank

    def call(self, method: str, /, *args: Any, **kwargs: Any) -> asyncio.Future:
        """Sends the call now; returns a future of the method's result.

        The future raises RemoteError if the method raised, WorkerFailed if the worker dies or
        the group shuts down first. Raises TypeError at once for arguments that cannot travel.
        Cancelling the future (or the task awaiting it) cancels the call on the worker.
        """
        return self.group._call(self.rank, method, args, kwargs)

    def __repr__(self) -> str:
        return f"ActorHandle(rank={self.rank})"


class CallFuture(asyncio.Future):
    """The future of one call; cancelling it cancels the call on the worker (no callback per
    call: the cancel itself tells the group)."""

    __slots__ = ("_group", "_rank", "_msg_id")

    def cancel(self, msg: Any = None) -> bool:
        if not super().cancel(msg):
            return False
        group = getattr(self, "_group", None)  # unset: the call was never sent
        if group is not None:
            group._cancelled(self._rank, self._msg_id)
        return True
