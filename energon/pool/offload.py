"""Weights that do not fit: which layers live in the pool, and the copy schedule that hides them.

When a stage's weights exceed its worker's budget, `choose_offloaded` picks the fewest decoder
layers, spread evenly through the stage (so resident layers' compute sits between their copies),
whose weights move to pooled memory (a peer GPU or pinned host memory, energon/pool/allocator.py).
The device keeps `buffers` (>= 2) staging buffers, each the size of the largest pooled layer.

`OffloadedStage` runs the schedule, with forward hooks and without touching model code:
the j-th pooled layer's parameters are permanently views into staging buffer j % B; buffer b's
users in a step are pooled layers b, b+B, b+2B, ... and, after the last of them, layer b of the
next step. So when pooled layer j finishes, the copy of the next user of its buffer is issued at
once on a side stream, B-1 pooled layers (and every resident layer between) ahead of its use:

    compute:  ... layer j (buffer b) ──record free[b]──▶ layer j+1 ... ──wait ready[b]──▶ layer j+B
    side:                          wait free[b] ─▶ copy j+B into b ─▶ record ready[b]

Events order the copy after the layer that last read the buffer, and the layer after its copy;
the host never synchronises. On a cpu device the same schedule runs with plain copies (CI tests
it); outputs equal the resident model exactly, since the same bytes reach the same kernels.
A layer whose copy was not issued (a step that failed half-way) is copied when it is reached.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from energon.errors import InvalidRequest
from energon.pool.allocator import fmt_bytes
from energon.pool.member import PoolMember
from energon.pool.messages import LeaseRevoked

ALIGN = 256  # bytes: every parameter's offset in a staging buffer / pooled region
DEFAULT_BUFFERS = 2


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def param_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of a module's distinct parameters; floating ones counted in `dtype` if given."""
    total = 0
    for p in {id(p): p for p in module.parameters()}.values():
        kind = dtype if dtype is not None and p.is_floating_point() else p.dtype
        total += p.numel() * torch.empty((), dtype=kind).element_size()
    return total


def layer_bytes(layer: nn.Module, dtype: torch.dtype | None = None) -> int:
    """A layer's size in a staging buffer: its parameters, each at an ALIGN-ed offset."""
    total = 0
    for p in {id(p): p for p in layer.parameters()}.values():
        kind = dtype if dtype is not None and p.is_floating_point() else p.dtype
        total = _aligned(total) + p.numel() * torch.empty((), dtype=kind).element_size()
    return _aligned(total)


def choose_offloaded(
    sizes: dict[int, int], fixed: int, budget: int, buffers: int = DEFAULT_BUFFERS
) -> list[int]:
    """The layers (keys of sizes: layer index -> bytes) whose weights go to the pool so that
    fixed + resident layers + `buffers` staging buffers fit in `budget`; [] if all fit.

    Takes the fewest layers, spread evenly. Raises InvalidRequest("gpu_memory_budget") when
    not even pooling every layer fits."""
    if buffers < 2:
        raise ValueError(f"buffers must be >= 2 (got {buffers})")
    order = sorted(sizes)
    total = fixed + sum(sizes.values())
    if total <= budget:
        return []
    count = len(order)
    for n in range(1, count + 1):
        picked = [order[math.floor((k + 0.5) * count / n)] for k in range(n)]
        staging = min(buffers, n) * max(sizes[i] for i in picked)
        if total - sum(sizes[i] for i in picked) + staging <= budget:
            return picked
    least = fixed + buffers * max(sizes.values(), default=0)
    raise InvalidRequest(
        "gpu_memory_budget",
        f"is too small: {fmt_bytes(budget)} cannot hold this stage's other weights "
        f"({fmt_bytes(fixed)}) plus {buffers} staging buffers of its largest layer; "
        f"it needs at least {fmt_bytes(least)}",
    )


@dataclass
class _Slot:
    module: nn.Module
    key: str
    offset: int
    nbytes: int


def _slots(layer: nn.Module) -> tuple[list[_Slot], int]:
    slots, seen, offset = [], {}, 0
    for module in layer.modules():
        for key, p in module._parameters.items():
            if p is None:
                continue
            if id(p) in seen:  # a parameter shared inside the layer: same place
                slots.append(_Slot(module, key, seen[id(p)].offset, seen[id(p)].nbytes))
                continue
            offset = _aligned(offset)
            slot = _Slot(module, key, offset, p.numel() * p.element_size())
            seen[id(p)] = slot
            slots.append(slot)
            offset += slot.nbytes
    return slots, _aligned(offset)


class OffloadedStage:
    """Pooled layers of one stage: their staging buffers, pooled regions, events and hooks.

    `layers`: {layer index: module}, the pooled ones, with their weights loaded (anywhere,
    typically on the cpu). Staging buffers are allocated now on `device`; `attach` then moves
    the weights into the pooled regions and starts the schedule."""

    def __init__(self, layers: dict[int, nn.Module], device: torch.device, buffers: int = 2):
        if buffers < 2:
            raise ValueError(f"buffers must be >= 2 (got {buffers})")
        self.device = torch.device(device)
        self.indices = sorted(layers)
        self.layers = [layers[i] for i in self.indices]
        layouts = [_slots(m) for m in self.layers]
        self.slots = [s for s, _ in layouts]
        self.sizes = [n for _, n in layouts]
        self.num_buffers = min(buffers, len(self.layers))
        size = max(self.sizes, default=0)
        self.staging = [
            torch.empty(size, dtype=torch.uint8, device=self.device)
            for _ in range(self.num_buffers)
        ]
        self.regions: list[torch.Tensor | None] = [None] * len(self.layers)
        self.holds = [-1] * self.num_buffers  # which pooled layer each buffer holds (or is copying)
        self.copies = 0
        self.trace: list[tuple[str, int]] | None = None  # ("copy"|"run", layer index) when set
        self.revoked = False
        self._hooks: list = []
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.ready = [torch.cuda.Event() if cuda else None for _ in range(self.num_buffers)]
        self.free = [torch.cuda.Event() if cuda else None for _ in range(self.num_buffers)]
        self.peer_streams: dict[int, torch.cuda.Stream] = {}  # side streams of lenders' GPUs

    @property
    def pooled_bytes(self) -> int:
        return sum(self.sizes)

    @property
    def staging_bytes(self) -> int:
        return sum(b.numel() for b in self.staging)

    def attach(self, regions: list[torch.Tensor]) -> None:
        """Copies each pooled layer's weights into its region (uint8, >= its size), rebinds its
        parameters to views of its staging buffer, installs the hooks, starts the first copies."""
        if len(regions) != len(self.layers):
            raise ValueError(f"need {len(self.layers)} regions (got {len(regions)})")
        for j, (layer, region) in enumerate(zip(self.layers, regions, strict=True)):
            if region.dtype != torch.uint8 or region.numel() < self.sizes[j]:
                raise ValueError(
                    f"region for layer {self.indices[j]} is smaller than {self.sizes[j]} bytes"
                )
            buffer = self.staging[j % self.num_buffers]
            for slot in self.slots[j]:
                param = slot.module._parameters[slot.key]
                source = param.detach().reshape(-1).view(torch.uint8)
                region[slot.offset : slot.offset + slot.nbytes].copy_(source)
                view = buffer[slot.offset : slot.offset + slot.nbytes].view(param.dtype)
                fresh = nn.Parameter(view.view(param.shape), requires_grad=False)
                fresh.__dict__.update(param.__dict__)
                slot.module._parameters[slot.key] = fresh
            self.regions[j] = region
            self._hooks.append(layer.register_forward_pre_hook(partial(self._before, j)))
            self._hooks.append(layer.register_forward_hook(partial(self._after, j)))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the regions are filled before any copy reads them
        for j in range(self.num_buffers):
            self._issue(j)

    # -- the schedule ----------------------------------------------------------------------

    def _issue(self, j: int) -> None:
        """Starts copying pooled layer j into its buffer, after the buffer's last reader."""
        b = j % self.num_buffers
        if self.holds[b] == j:
            return
        region = self.regions[j]
        if region is None:
            raise LeaseRevoked(
                f"the pooled weights of layer {self.indices[j]} are gone (their lender died)"
            )
        size = self.sizes[j]
        if self.stream is None:
            self.staging[b][:size].copy_(region[:size])
        else:
            with torch.cuda.stream(self.stream), self._source_stream(region):
                self.stream.wait_event(self.free[b])
                self.staging[b][:size].copy_(region[:size], non_blocking=True)
                self.ready[b].record(self.stream)
        self.holds[b] = j
        self.copies += 1
        if self.trace is not None:
            self.trace.append(("copy", self.indices[j]))

    def _source_stream(self, region: torch.Tensor):
        """torch runs a copy from another GPU on the *source* device's current stream; make that
        a side stream too, or the copies land on the lender GPU's legacy default stream."""
        if region.device.type != "cuda" or region.device == self.device:
            return contextlib.nullcontext()
        index = region.device.index
        if index not in self.peer_streams:
            self.peer_streams[index] = torch.cuda.Stream(region.device)
        return torch.cuda.stream(self.peer_streams[index])

    def _before(self, j: int, module, args) -> None:
        b = j % self.num_buffers
        if self.holds[b] != j:
            self._issue(j)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[b])
        if self.trace is not None:
            self.trace.append(("run", self.indices[j]))

    def _after(self, j: int, module, args, output) -> None:
        b = j % self.num_buffers
        if self.stream is not None:
            self.free[b].record(torch.cuda.current_stream(self.device))
        nxt = j + self.num_buffers
        self._issue(nxt if nxt < len(self.layers) else b)

    # -- facts and teardown ------------------------------------------------------------------

    def measure_copy(self) -> float:
        """Seconds one step's copies take when nothing hides them (measured once, synchronised:
        a start-up figure, never called per step)."""
        if not self.layers:
            return 0.0
        sync = torch.cuda.synchronize if self.stream is not None else (lambda device=None: None)
        sync(self.device)
        t0 = time.perf_counter()
        for j, region in enumerate(self.regions):
            if region is None:
                raise LeaseRevoked("pooled weights are gone")
            b = j % self.num_buffers
            self.staging[b][: self.sizes[j]].copy_(region[: self.sizes[j]], non_blocking=True)
        sync(self.device)
        seconds = time.perf_counter() - t0
        self.holds = [-1] * self.num_buffers  # the buffers now hold whatever was copied last
        for j in range(self.num_buffers):
            self._issue(j)
        return seconds

    def revoke(self) -> None:
        """Drops every view of the pooled regions; a later step raises LeaseRevoked."""
        if self.stream is not None:
            self.stream.synchronize()
        for stream in self.peer_streams.values():
            stream.synchronize()
        self.regions = [None] * len(self.layers)
        self.holds = [-1] * self.num_buffers
        self.revoked = True

    def close(self) -> None:
        """Removes the hooks and drops the regions (the pool frees them)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self.revoke()


# ------------------------------------------------------------------------ the runner's side


class OffloadMember(PoolMember):
    """Mixin for ModelRunner: plan pooled layers at build time, attach the leases later.

    ModelRunner calls `_offload_planner(options)` for build_stage's `host_layers` and
    `_prepare_offload()` after loading; the controller then calls `pool_needs()` and, once it has
    borrowed one lease per region, `pool_attach(lease ids)`."""

    offload: OffloadedStage | None = None
    _offload_leases: list[int] = []

    def _offload_planner(self, options: dict | None) -> Callable | None:
        """build_stage's `host_layers` callback for pool options {"mode", "budget", "reserve",
        "buffers"} (None: no pooling)."""
        if not options or options.get("mode") is None:
            return None
        self._pool_options = dict(options)

        def plan(model: nn.Module, layers: range) -> list[int]:
            budget = self._weight_budget(options)
            if budget is None:
                return []
            sizes = {i: layer_bytes(model.layers[i], self.dtype) for i in layers}
            fixed = param_bytes(model, self.dtype) - sum(
                param_bytes(model.layers[i], self.dtype) for i in layers
            )
            buffers = int(options.get("buffers") or DEFAULT_BUFFERS)
            self._pooled_layers = choose_offloaded(sizes, fixed, budget, buffers)
            return self._pooled_layers

        return plan

    def _weight_budget(self, options: dict) -> int | None:
        """The given budget, or on cuda the free memory less the KV-cache reserve; else None."""
        if options.get("budget") is not None:
            return int(options["budget"])
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        reserve = options.get("reserve") or total // 10
        return max(0, free - reserve - (1 << 30))

    def _prepare_offload(self) -> None:
        """After loading: staging buffers for the pooled layers (their weights wait on the cpu)."""
        pooled = getattr(self, "_pooled_layers", None)
        if pooled:
            buffers = int(self._pool_options.get("buffers") or DEFAULT_BUFFERS)
            layers = {i: self.model.layers[i] for i in pooled}
            self.offload = OffloadedStage(layers, self.device, buffers)

    def pool_needs(self) -> list[int]:
        """Bytes of each region this stage needs from the pool (one per pooled layer); [] if its
        weights fit."""
        if self.offload is None or self._offload_leases:
            return []
        return list(self.offload.sizes)

    def pool_attach(self, leases: list[int]) -> dict:
        """Moves the pooled layers' weights into the mapped leases (one per pool_needs entry)
        and starts prefetching; returns pool_report()."""
        stage = self.offload
        if stage is None:
            raise ValueError("this stage has no pooled layers")
        regions = [self.pool_buffer(lease) for lease in leases]
        stage.attach(regions)
        self._offload_leases = list(leases)
        self._offload_where = {
            i: self._pool.borrowed[x].handle for i, x in zip(stage.indices, leases, strict=True)
        }
        self.pool_on_revoke(self._on_lease_revoked)
        self._copy_seconds = stage.measure_copy()
        return self.pool_report()

    def _on_lease_revoked(self, lease: int) -> None:
        if self.offload is not None and lease in self._offload_leases:
            self.offload.revoke()

    def pool_report(self) -> dict:
        """Where this stage's weights live: {"rank", "device", "resident": [layer], "pooled":
        {layer: "cuda:1 (worker 1)" | "host (worker 0)"}, "pooled_bytes", "staging_bytes",
        "copy_seconds" (one step's copies, unhidden)}."""
        stage = self.offload
        pooled = {}
        for i, h in getattr(self, "_offload_where", {}).items():
            pooled[str(i)] = (
                f"cuda:{h.device}" if h.kind == "cuda" else "host"
            ) + f" (worker {h.lender})"
        return {
            "rank": self.state.rank,
            "device": str(self.device),
            "resident": [i for i in self.layer_range if stage is None or i not in stage.indices],
            "pooled": pooled,
            "pooled_bytes": stage.pooled_bytes if stage else 0,
            "staging_bytes": stage.staging_bytes if stage else 0,
            "copy_seconds": getattr(self, "_copy_seconds", 0.0),
        }
