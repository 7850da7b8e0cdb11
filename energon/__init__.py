"""Energon: serve large transformer language models from asyncio, on one GPU or many.

from energon import Engine, SamplingParams
"""

from energon.errors import (
    CheckpointError,
    EnergonError,
    InvalidRequest,
    Overloaded,
    RemoteError,
    WorkerFailed,
)
from energon.sampling import Completion, SamplingParams, StreamPiece, Timings, Usage

__all__ = [
    "CheckpointError",
    "Client",
    "Completion",
    "Engine",
    "EnergonError",
    "InvalidRequest",
    "Overloaded",
    "RemoteError",
    "SamplingParams",
    "StreamPiece",
    "Timings",
    "Usage",
    "WorkerFailed",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The Engine pulls in torch and the actor runtime; import it only when asked for, so that
    # `import energon` (e.g. in a worker or for SamplingParams) stays light.
    if name == "Engine":
        from energon.engine import Engine

        return Engine
    if name == "Client":
        from energon.server.client import Client

        return Client
    raise AttributeError(f"module 'energon' has no attribute {name!r}")
