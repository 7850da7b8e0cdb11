"""Every exception Energon raises on purpose. Each says what went wrong and what to do."""

from __future__ import annotations


class EnergonError(Exception):
    """Base of every error Energon raises on purpose."""


class InvalidRequest(EnergonError, ValueError):
    """A request or argument is out of range; raised before anything is queued.

    `field` names the offending argument, e.g. InvalidRequest("max_tokens", "must be >= 1 (got 0)").
    """

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field} {problem}")


class Overloaded(EnergonError):
    """Too many requests are waiting; retry later (admission control)."""


class RemoteError(EnergonError):
    """A worker method raised; carries the remote exception's type name, message and traceback."""

    def __init__(
        self, remote_type: str, message: str, traceback: str = "", rank: int | None = None
    ):
        self.remote_type = remote_type
        self.message = message
        self.traceback = traceback
        self.rank = rank
        where = f" on worker {rank}" if rank is not None else ""
        super().__init__(f"{remote_type}{where}: {message}")

    def __reduce__(self):
        return (type(self), (self.remote_type, self.message, self.traceback, self.rank))


class WorkerFailed(EnergonError):
    """A worker process died, exited or stopped heartbeating; its in-flight calls fail with this."""

    def __init__(self, rank: int, reason: str):
        self.rank = rank
        self.reason = reason
        super().__init__(f"worker {rank} failed: {reason}")

    def __reduce__(self):
        return (type(self), (self.rank, self.reason))


class ProtocolError(EnergonError):
    """A message on the wire is malformed (bad version, types, frames or size)."""


class CheckpointError(EnergonError):
    """A checkpoint folder is unusable; the message names the file or tensor."""


class PoolExhausted(EnergonError):
    """The memory pool cannot lend what was asked; says how much was asked and what was free."""
