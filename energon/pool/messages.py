"""The pool's messages: what a lender offers, and the handle a borrower maps. Plain values only.

They travel as the arguments and results of ordinary actor calls (msgpack, no pickle), so each
class has `to_wire()` -> dict and `from_wire(dict)`, which validates what it reads and raises
ValueError naming the bad field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from energon.errors import EnergonError

SHM = "shm"  # POSIX shared memory (/dev/shm), pinned with cudaHostRegister on a CUDA borrower
CUDA = "cuda"  # a cuMemAlloc on the lender's GPU, exported by CUDA IPC
KINDS = (SHM, CUDA)
SHM_PREFIX = "energon-pool-"  # every segment's name starts so (tests look for leftovers)


class LeaseRevoked(EnergonError):
    """A borrowed region is gone (its lender died or the pool took it back); the weights in it
    can no longer be read. Restart the Engine."""


def _fields(cls, wire: dict, types: dict) -> dict:
    if not isinstance(wire, dict):
        raise ValueError(f"{cls.__name__} must arrive as a dict (got {type(wire).__name__})")
    out = {}
    for name, kind in types.items():
        value = wire.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{cls.__name__}.{name} must be {kind} (got {value!r:.80})")
        out[name] = value
    return out


@dataclass(frozen=True)
class Offer:
    """What one worker can lend: device memory (0 on a cpu worker) and the host memory of its
    machine (shared by every worker on `host`; the pool counts it once per host)."""

    rank: int
    host: str
    device: str  # "cuda:1" or "cpu"
    device_spare: int
    host_spare: int

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: dict) -> Offer:
        types = {"rank": int, "host": str, "device": str, "device_spare": int, "host_spare": int}
        return cls(**_fields(cls, wire, types))


@dataclass(frozen=True)
class Handle:
    """How a borrower maps lease `lease`: a shm segment `name`, or CUDA IPC `ipc` on `device`."""

    lease: int
    kind: str
    nbytes: int
    lender: int
    name: str = ""  # shm
    device: int = -1  # cuda: the lender's device index (same host, same numbering)
    ipc: bytes = b""  # cuda: the 64-byte IPC handle

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, wire: dict) -> Handle:
        types = {
            "lease": int,
            "kind": str,
            "nbytes": int,
            "lender": int,
            "name": str,
            "device": int,
            "ipc": bytes,
        }
        handle = cls(**_fields(cls, wire, types))
        if handle.kind not in KINDS:
            raise ValueError(f"Handle.kind must be one of {KINDS} (got {handle.kind!r})")
        if handle.nbytes < 1:
            raise ValueError(f"Handle.nbytes must be >= 1 (got {handle.nbytes})")
        if handle.kind == SHM and not handle.name.startswith(SHM_PREFIX) or "/" in handle.name:
            raise ValueError(f"Handle.name must be a pool segment name (got {handle.name!r})")
        return handle
