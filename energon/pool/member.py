"""The worker side of the pool: lend memory, map what was borrowed, give it back.

`PoolMember` is a mixin for an actor class (ModelRunner inherits it). Its `pool_*` methods are
ordinary sync actor methods, so the pool service in the controller (energon/pool/allocator.py)
drives them with `group[rank].call(...)`, in order with the worker's other calls:

    lender.pool_lend(lease, nbytes, kind, name) -> Handle     # allocate and export
    borrower.pool_map(handle)                                  # map; the region is usable
    borrower.pool_unmap(lease) / borrower.pool_revoke(lease)   # drop the mapping
    lender.pool_reclaim(lease)                                 # free the memory

Host memory is a POSIX shared-memory file in /dev/shm that the lender creates (fallocated, so a
full /dev/shm fails here and not with SIGBUS later) and the borrower maps; the borrower unlinks the
name as soon as it has mapped it, so from then on no process death can leave the segment behind:
the kernel frees it when the last of the two mappings goes. A CUDA borrower pins its mapping
(cudaHostRegister) so copies from it are asynchronous DMA. Device memory is a cuMemAlloc on the
lender's GPU exported by CUDA IPC (energon/pool/cuda_ipc.py).
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from energon.pool.messages import CUDA, SHM, SHM_PREFIX, Handle, LeaseRevoked, Offer

SHM_DIR = "/dev/shm"


class ShmSegment:
    """A /dev/shm file of `nbytes`, mapped shared. `create` makes it (and fails if it exists)."""

    def __init__(self, name: str, nbytes: int, create: bool):
        self.name, self.nbytes = name, nbytes
        self.path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                try:
                    os.posix_fallocate(fd, 0, nbytes)
                except OSError:
                    os.unlink(self.path)
                    raise
            elif os.fstat(fd).st_size < nbytes:
                raise ValueError(f"shared memory {name} holds fewer than {nbytes} bytes")
            self.mm = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.pinned = False

    def tensor(self) -> torch.Tensor:
        """A uint8 tensor [nbytes] over the mapping (it keeps the mapping alive)."""
        return torch.frombuffer(self.mm, dtype=torch.uint8)

    def unlink(self) -> None:
        """Removes the name; the memory stays until every mapping is gone. Idempotent."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def pin(self, base: torch.Tensor) -> None:
        """Page-locks the mapping for asynchronous host→device copies (cudaHostRegister)."""
        code = torch.cuda.cudart().cudaHostRegister(base.data_ptr(), self.nbytes, 0)
        self.pinned = int(code) == 0

    def close(self, base: torch.Tensor | None = None) -> None:
        """Unpins and unmaps. If tensors over it are still alive elsewhere, the mapping goes
        when the last of them does."""
        if self.pinned and base is not None:
            torch.cuda.cudart().cudaHostUnregister(base.data_ptr())
            self.pinned = False
        with contextlib.suppress(BufferError):
            self.mm.close()


@dataclass
class _Region:
    handle: Handle
    resource: object  # ShmSegment | CudaAllocation | CudaMapping
    tensor: torch.Tensor


@dataclass
class PoolSide:
    """One worker's leases: what it lent, what it borrowed, what was revoked."""

    lent: dict[int, _Region] = field(default_factory=dict)
    borrowed: dict[int, _Region] = field(default_factory=dict)
    revoked: set[int] = field(default_factory=set)
    listeners: list[Callable[[int], None]] = field(default_factory=list)


def host_spare_bytes() -> int:
    """Half of what both /dev/shm and the machine (MemAvailable) have free."""
    st = os.statvfs(SHM_DIR)
    shm_free = st.f_bavail * st.f_frsize
    available = shm_free
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    return min(shm_free, available) // 2


def _unlink_lent(side: PoolSide) -> None:
    """At a clean exit: names of segments lent but never mapped must not outlive the worker."""
    for region in list(side.lent.values()):
        if isinstance(region.resource, ShmSegment):
            region.resource.unlink()


class PoolMember:
    """Mixin: the pool_* actor methods. The actor may set `self.device` (a torch.device);
    without it the worker lends host memory only."""

    @property
    def _pool(self) -> PoolSide:
        side = self.__dict__.get("_pool_side")
        if side is None:
            side = self.__dict__["_pool_side"] = PoolSide()
            atexit.register(_unlink_lent, side)
        return side

    def _pool_device(self) -> torch.device:
        return torch.device(getattr(self, "device", "cpu"))

    # -- lender ------------------------------------------------------------------------------

    def _pool_rank(self) -> int:
        from energon.actors import actor_context

        try:
            return actor_context().rank
        except RuntimeError:  # in-process use (tests)
            return getattr(getattr(self, "state", None), "rank", 0)

    def pool_offer(self, reserve: int | None = None) -> dict:
        """What this worker can lend: {"rank", "host", "device", "device_spare", "host_spare"}.
        device_spare is the GPU's free memory less `reserve` (default a tenth of the GPU, for
        this worker's own KV cache) less 1 GiB for activations; 0 on a cpu worker."""
        device = self._pool_device()
        spare = 0
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            keep = (total // 10 if reserve is None else reserve) + (1 << 30)
            spare = max(0, free - keep)
        offer = Offer(
            self._pool_rank(), socket.gethostname(), str(device), spare, host_spare_bytes()
        )
        return offer.to_wire()

    def pool_lend(self, lease: int, nbytes: int, kind: str, name: str = "") -> dict:
        """Allocates `nbytes` for lease `lease` ("cuda": on this worker's GPU, "shm": a host
        segment called `name`); returns the Handle a borrower maps. Raises on exhaustion."""
        if lease in self._pool.lent:
            raise ValueError(f"lease {lease} is already lent by this worker")
        rank = self._pool_rank()
        if kind == CUDA:
            from energon.pool.cuda_ipc import CudaAllocation

            device = self._pool_device()
            if device.type != "cuda":
                raise ValueError(f"worker {rank} has no GPU to lend from (device {device})")
            alloc = CudaAllocation(device.index, nbytes)
            handle = Handle(lease, CUDA, nbytes, rank, device=device.index, ipc=alloc.ipc_handle())
            region = _Region(handle, alloc, alloc.tensor())
        elif kind == SHM:
            if not name.startswith(SHM_PREFIX) or "/" in name:
                raise ValueError(
                    f"shared memory name must start with {SHM_PREFIX!r} (got {name!r})"
                )
            seg = ShmSegment(name, nbytes, create=True)
            handle = Handle(lease, SHM, nbytes, rank, name=name)
            region = _Region(handle, seg, seg.tensor())
        else:
            raise ValueError(f"kind must be {CUDA!r} or {SHM!r} (got {kind!r})")
        self._pool.lent[lease] = region
        return handle.to_wire()

    def pool_reclaim(self, lease: int) -> bool:
        """Frees lent memory (the borrower has unmapped it, or died). False if not lent here."""
        region = self._pool.lent.pop(lease, None)
        if region is None:
            return False
        region.tensor = None
        if isinstance(region.resource, ShmSegment):
            region.resource.unlink()
            region.resource.close()
        else:
            region.resource.free()
        return True

    # -- borrower ----------------------------------------------------------------------------

    def pool_map(self, handle: dict) -> int:
        """Maps a lent region (a Handle's wire form) into this process; returns its bytes."""
        h = Handle.from_wire(handle)
        if h.lease in self._pool.borrowed:
            raise ValueError(f"lease {h.lease} is already mapped by this worker")
        if h.kind == CUDA:
            from energon.pool.cuda_ipc import CudaMapping

            mapping = CudaMapping(h.device, h.ipc, h.nbytes)
            region = _Region(h, mapping, mapping.tensor())
        else:
            seg = ShmSegment(h.name, h.nbytes, create=False)
            seg.unlink()  # both sides hold it now: the name has done its job
            base = seg.tensor()
            if self._pool_device().type == "cuda":
                seg.pin(base)
            region = _Region(h, seg, base)
        self._pool.borrowed[h.lease] = region
        return h.nbytes

    def pool_buffer(self, lease: int) -> torch.Tensor:
        """The uint8 tensor over a lease this worker borrowed or lent (worker-local API).
        Raises LeaseRevoked if it was revoked, KeyError if unknown."""
        if lease in self._pool.revoked:
            raise LeaseRevoked(f"lease {lease} was revoked: its lender is gone")
        region = self._pool.borrowed.get(lease) or self._pool.lent.get(lease)
        if region is None:
            raise KeyError(f"lease {lease} is neither borrowed nor lent by this worker")
        return region.tensor

    def pool_on_revoke(self, callback: Callable[[int], None]) -> None:
        """Calls callback(lease) before a borrowed region is unmapped (to drop views of it)."""
        self._pool.listeners.append(callback)

    def pool_unmap(self, lease: int) -> bool:
        """Drops the mapping of a borrowed lease; False if it is not mapped here."""
        region = self._pool.borrowed.pop(lease, None)
        if region is None:
            return False
        for callback in self._pool.listeners:
            callback(lease)
        resource, tensor = region.resource, region.tensor
        region.tensor = None
        if isinstance(resource, ShmSegment):
            resource.close(tensor)
        else:
            del tensor
            resource.close()
        return True

    def pool_revoke(self, lease: int) -> bool:
        """The lender is gone: unmap, and make later use raise LeaseRevoked."""
        self._pool.revoked.add(lease)
        return self.pool_unmap(lease)

    def pool_state(self) -> dict:
        """{"lent": {lease: bytes}, "borrowed": {lease: bytes}, "revoked": [lease]} (str keys)."""
        side = self._pool
        return {
            "lent": {str(k): r.handle.nbytes for k, r in side.lent.items()},
            "borrowed": {str(k): r.handle.nbytes for k, r in side.borrowed.items()},
            "revoked": sorted(side.revoked),
        }
