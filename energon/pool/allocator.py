"""The pool service: lends workers' spare memory (peer GPUs, pinned host memory) to other workers.

    pool = Pool(group, mode="auto")          # in the controller, on its event loop
    await pool.survey(reserve=...)           # each worker's spare memory (pool_offer)
    lease = await pool.borrow(nbytes, near=rank)   # mapped in worker `rank` when it returns
    await pool.free(lease)                   # unmapped by the borrower, freed by the lender
    await pool.close()                       # every lease back (also at Engine shutdown)

How a worker's request reaches the pool: it does not travel worker→controller. Weights are the
only thing pooled, and a stage knows at load time how many bytes it cannot hold, so the
controller asks (`pool_needs`), borrows on the worker's behalf, and the worker finds its regions
mapped when `pool_attach` arrives. Every step of that is an ordinary controller→worker actor
call (energon/actors): no back-channel socket, no message kinds of our own, ordering and
liveness (heartbeats, process sentinels, WorkerFailed) for free. The handle a lender exports is a
plain dict (energon/pool/messages.py), msgpack on the wire. A worker-initiated path (a DEALER to
a ROUTER of the pool) would only be needed for borrowing mid-run, which nothing does yet.

Lender choice for `borrow(nbytes, near=rank)`: "peer" lends from another GPU worker's device
memory (CUDA IPC), the one with the most free first; "host" from shared memory on the borrower's
machine, lent by another worker there if any, else by the borrower itself; "auto" tries peers,
then host. Leases come back on `free`, on `close`, when the borrower dies (the lender frees) and
when the lender dies (borrowers are told, `pool_revoke`, and any segment name left is unlinked).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from dataclasses import dataclass

from energon.errors import PoolExhausted, WorkerFailed
from energon.pool.messages import CUDA, SHM, SHM_PREFIX, Offer

log = logging.getLogger("energon")

MODES = ("auto", "peer", "host")


def fmt_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@dataclass
class Lease:
    """One borrowed region: `nbytes` lent by worker `lender` to worker `borrower`.

    kind is "cuda" (peer GPU memory) or "shm" (host memory); state is "lent" (allocated, not yet
    mapped), "mapped", "freed" or "revoked" (the lender died)."""

    id: int
    nbytes: int
    lender: int
    borrower: int
    kind: str
    where: str  # "cuda:1" or "host:<hostname>"
    name: str = ""  # shm segment name
    state: str = "lent"

    @property
    def active(self) -> bool:
        return self.state in ("lent", "mapped")


class Pool:
    """Lendable memory of an ActorGroup whose actors are PoolMembers (see module docstring)."""

    def __init__(
        self,
        group,
        mode: str = "auto",
        *,
        device_budget: int | None = None,
        host_budget: int | None = None,
    ):
        """device_budget / host_budget cap what each GPU / each machine lends (default: what the
        workers offer). Raises ValueError for an unknown mode."""
        if mode not in MODES:
            raise ValueError(f"pool must be one of {', '.join(MODES)} or None (got {mode!r})")
        self.group = group
        self.mode = mode
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.offers: dict[int, Offer] = {}
        self.leases: dict[int, Lease] = {}
        self._ids = itertools.count(1)
        self._tag = f"{SHM_PREFIX}{os.getpid()}-{id(self) & 0xFFFFFF:x}-"
        self._cleanup: set[asyncio.Future] = set()
        self._closed = False
        group.add_failure_callback(self._on_failure)

    # ----------------------------------------------------------------------------- budgets

    async def survey(self, reserve: int | None = None) -> dict[int, Offer]:
        """Asks every live worker what it can lend (GPU memory beyond `reserve` bytes kept for
        its own KV cache, default a tenth of the GPU; host memory); returns {rank: Offer}."""
        ranks = [r for r in range(self.group.world_size) if self.group.is_alive(r)]
        offers = await asyncio.gather(*(self.group[r].call("pool_offer", reserve) for r in ranks))
        self.offers = {r: Offer.from_wire(o) for r, o in zip(ranks, offers, strict=True)}
        return self.offers

    def _lent(self, where: str) -> int:
        return sum(x.nbytes for x in self.leases.values() if x.active and x.where == where)

    def free_bytes(self) -> dict[str, int]:
        """What is left to lend: {"cuda:1" (rank 1's GPU, as 'rank1:cuda:1'), "host:<name>"}."""
        out: dict[str, int] = {}
        for rank, offer in self.offers.items():
            if offer.device.startswith("cuda") and self.group.is_alive(rank):
                where = f"rank{rank}:{offer.device}"
                cap = offer.device_spare
                if self.device_budget is not None:
                    cap = min(cap, self.device_budget)
                out[where] = max(0, cap - self._lent(where))
            host = f"host:{offer.host}"
            if host not in out and self.group.is_alive(rank):
                cap = offer.host_spare if self.host_budget is None else self.host_budget
                out[host] = max(0, cap - self._lent(host))
        return out

    def _choose(self, nbytes: int, near: int, kind: str | None) -> tuple[int, str, str]:
        """(lender rank, kind, where) with room for nbytes; raises PoolExhausted."""
        free = self.free_bytes()
        mode = {CUDA: "peer", SHM: "host", None: self.mode}[kind]
        if mode in ("auto", "peer"):
            peers = [
                (free[f"rank{r}:{o.device}"], r, o)
                for r, o in self.offers.items()
                if r != near and f"rank{r}:{o.device}" in free
            ]
            for room, rank, offer in sorted(peers, key=lambda t: (-t[0], t[1])):
                if room >= nbytes:
                    return rank, CUDA, f"rank{rank}:{offer.device}"
        if mode in ("auto", "host") and near in self.offers:
            host = self.offers[near].host
            where = f"host:{host}"
            if free.get(where, 0) >= nbytes:
                local = [
                    r for r, o in self.offers.items() if o.host == host and self.group.is_alive(r)
                ]
                others = [r for r in local if r != near] or [near]
                lender = min(others, key=lambda r: (self._lent_by(r), r))
                return lender, SHM, where
        shown = ", ".join(f"{w} {fmt_bytes(n)}" for w, n in free.items()) or "nothing"
        raise PoolExhausted(
            f"the pool (mode {mode!r}) cannot lend {fmt_bytes(nbytes)} ({nbytes} bytes) to "
            f"worker {near}: free {shown}; lower the weights' footprint, raise "
            "gpu_memory_budget, or allow pool='host'"
        )

    def _lent_by(self, rank: int) -> int:
        return sum(x.nbytes for x in self.leases.values() if x.active and x.lender == rank)

    # ----------------------------------------------------------------------------- leases

    async def borrow(self, nbytes: int, near: int, kind: str | None = None) -> Lease:
        """Lends nbytes to worker `near` and has it map them; returns the Lease once mapped.

        kind forces "cuda" or "shm" (default: by the pool's mode). Raises PoolExhausted naming
        what was asked and what was free, WorkerFailed / RemoteError if a worker fails on the way
        (whatever was allocated is freed again)."""
        if self._closed:
            raise PoolExhausted("the pool is closed")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
            raise ValueError(f"nbytes must be an int >= 1 (got {nbytes!r})")
        if not self.offers:
            await self.survey()
        lender, kind, where = self._choose(nbytes, near, kind)
        lease = Lease(next(self._ids), nbytes, lender, near, kind, where)
        if kind == SHM:
            lease.name = f"{self._tag}{lease.id}"
        self.leases[lease.id] = lease  # counted from now on, so concurrent borrows see it
        try:
            handle = await self.group[lender].call("pool_lend", lease.id, nbytes, kind, lease.name)
            await self.group[near].call("pool_map", handle)
        except BaseException:
            lease.state = "freed"
            await self._reclaim(lease)
            raise
        if lease.state == "lent":
            lease.state = "mapped"
        else:  # a worker died while it was being mapped; the failure callback cleaned up
            raise WorkerFailed(
                lender if lease.state == "revoked" else near, "lease lost while mapping"
            )
        return lease

    async def free(self, lease: Lease) -> None:
        """Unmaps in the borrower, then frees in the lender. Idempotent."""
        if not lease.active:
            return
        lease.state = "freed"
        if self.group.is_alive(lease.borrower):
            with contextlib.suppress(WorkerFailed):
                await self.group[lease.borrower].call("pool_unmap", lease.id)
        await self._reclaim(lease)

    async def _reclaim(self, lease: Lease) -> None:
        if self.group.is_alive(lease.lender):
            with contextlib.suppress(WorkerFailed):
                await self.group[lease.lender].call("pool_reclaim", lease.id)
        self._unlink(lease)

    def _unlink(self, lease: Lease) -> None:
        """The segment name, if a lender died before anyone unlinked it (same machine only)."""
        offer = self.offers.get(lease.lender)
        if lease.name and (offer is None or offer.host == socket.gethostname()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", lease.name))

    async def close(self) -> None:
        """Returns every active lease (borrowers unmap, lenders free). Idempotent."""
        self._closed = True
        await self.settle()
        await asyncio.gather(
            *(self.free(x) for x in list(self.leases.values()) if x.active), return_exceptions=True
        )

    async def settle(self) -> None:
        """Waits for the clean-up that worker failures started (revocations, reclaims)."""
        await asyncio.sleep(0)  # failure callbacks are scheduled with call_soon: let them run
        while self._cleanup:
            await asyncio.gather(*list(self._cleanup), return_exceptions=True)

    # ----------------------------------------------------------------------------- failures

    def _on_failure(self, failure: WorkerFailed) -> None:
        dead = failure.rank
        for lease in self.leases.values():
            if not lease.active:
                continue
            if lease.lender == dead:
                lease.state = "revoked"
                self._unlink(lease)
                if self.group.is_alive(lease.borrower):
                    self._later(self.group[lease.borrower].call("pool_revoke", lease.id))
                log.warning(
                    "energon pool: worker %d died; lease %d (%s lent to worker %d) is revoked",
                    dead,
                    lease.id,
                    fmt_bytes(lease.nbytes),
                    lease.borrower,
                )
            elif lease.borrower == dead:
                lease.state = "freed"
                self._later(self._reclaim(lease))

    def _later(self, aw) -> None:
        fut = asyncio.ensure_future(aw)
        self._cleanup.add(fut)
        fut.add_done_callback(self._cleanup_done)

    def _cleanup_done(self, fut: asyncio.Future) -> None:
        self._cleanup.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            log.warning("energon pool: clean-up after a worker failure failed: %r", fut.exception())

    def stats(self) -> dict:
        """{"leases": active count, "lent_bytes", "free": free_bytes()}."""
        active = [x for x in self.leases.values() if x.active]
        return {
            "leases": len(active),
            "lent_bytes": sum(x.nbytes for x in active),
            "free": self.free_bytes(),
        }


# --------------------------------------------------------------------------- Engine start-up


async def pool_weights(group, mode: str, reserve: int | None = None) -> Pool | None:
    """At Engine start-up, after every rank loaded: borrows one region per pooled layer of
    each rank that needs it (`pool_needs`), has the rank attach them (`pool_attach`) and logs
    where each layer's weights live and the copy time per step. Returns the Pool, or None when
    every stage fits. Raises PoolExhausted when the pool cannot lend enough."""
    needs = await group.broadcast("pool_needs")
    if not any(needs):
        return None
    pool = Pool(group, mode)
    try:
        await pool.survey(reserve)
        for rank, sizes in enumerate(needs):
            if not sizes:
                continue
            leases = [await pool.borrow(n, near=rank) for n in sizes]
            report = await group[rank].call("pool_attach", [x.id for x in leases])
            log_report(report)
    except BaseException:
        await pool.close()
        raise
    return pool


def log_report(report: dict) -> None:
    """Logs one rank's pool_report: resident layers, where each pooled layer lives, copy time."""
    places: dict[str, list[str]] = {}
    for layer, where in report["pooled"].items():
        places.setdefault(where, []).append(layer)
    pooled = "; ".join(f"layers {', '.join(ls)} in {w}" for w, ls in places.items())
    log.info(
        "energon: worker %d: layers %s resident on %s; %s; %s pooled, staging %s; "
        "copies take %.2f ms per step (hidden behind compute when shorter than it)",
        report["rank"],
        ", ".join(map(str, report["resident"])) or "none",
        report["device"],
        pooled,
        fmt_bytes(report["pooled_bytes"]),
        fmt_bytes(report["staging_bytes"]),
        report["copy_seconds"] * 1e3,
    )
