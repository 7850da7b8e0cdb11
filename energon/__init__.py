"""Energon: serve large transformer language models from asyncio, on one GPU or many."""

from energon.errors import (
    CheckpointError,
    EnergonError,
    InvalidRequest,
    Overloaded,
    RemoteError,
    WorkerFailed,
)

__all__ = [
    "CheckpointError",
    "EnergonError",
    "InvalidRequest",
    "Overloaded",
    "RemoteError",
    "WorkerFailed",
]
__version__ = "0.1.0"
