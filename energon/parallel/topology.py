"""Ranks → (pipeline stage, tensor-parallel rank), the process groups, and the state layers read.

Rank layout: rank = stage * tp + tp_rank, so the workers of one stage are neighbours.
Layers read their tp rank/size/group from `current_parallel()`, which is whatever `use_parallel`
set for the code building them (a context variable, not a global): outside any `use_parallel`
everything is a single device (tp=1, pp=1).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# NVLink multicast stays off in every worker process: on shared hosts a program that uses it can
# put the GPUs out of service (NCCL NVLS, torch symmetric memory, NVSHMEM).
NO_MULTICAST_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


@dataclass(frozen=True)
class Topology:
    """How `tp * pp` ranks are arranged: `pp` stages of `tp` tensor-parallel workers each."""

    tp: int = 1
    pp: int = 1

    def __post_init__(self):
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1 (got tp={self.tp}, pp={self.pp})")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def stage_of(self, rank: int) -> int:
        return rank // self.tp

    def tp_rank_of(self, rank: int) -> int:
        return rank % self.tp

    def rank_of(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank_of(stage, r) for r in range(self.tp)]


@dataclass
class ParallelState:
    """One rank's place in a topology, with its tensor-parallel process group (None when tp=1)."""

    topology: Topology = field(default_factory=Topology)
    rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # the groups of this rank and its peer on the previous / next stage (activations; pp > 1)
    prev_group: dist.ProcessGroup | None = None
    next_group: dist.ProcessGroup | None = None
    # the group of the last and the first stage's tp rank 0: sampled tokens handed back (pp > 1;
    # energon/parallel/token_return.py)
    return_group: dist.ProcessGroup | None = None

    @property
    def stage(self) -> int:
        return self.topology.stage_of(self.rank)

    @property
    def tp_rank(self) -> int:
        return self.topology.tp_rank_of(self.rank)

    @property
    def tp_size(self) -> int:
        return self.topology.tp

    @property
    def pp_size(self) -> int:
        return self.topology.pp

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp_size - 1

    @property
    def prev_rank(self) -> int | None:
        """The rank of the same tp_rank on the previous stage; None on the first stage."""
        return None if self.is_first_stage else self.topology.rank_of(self.stage - 1, self.tp_rank)

    @property
    def next_rank(self) -> int | None:
        """The rank of the same tp_rank on the next stage; None on the last stage."""
        return None if self.is_last_stage else self.topology.rank_of(self.stage + 1, self.tp_rank)


TIMEOUT_ENV = "ENERGON_COLLECTIVE_TIMEOUT_S"


def collective_timeout_s() -> float:
    """Seconds a collective or a point-to-point transfer may wait before the process group
    gives up on it (on NCCL the watchdog then ends the worker): $ENERGON_COLLECTIVE_TIMEOUT_S,
    default 300. Raises ValueError naming the variable unless it is a number > 0."""
    raw = os.environ.get(TIMEOUT_ENV, "300")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < math.inf:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0 (got {raw!r})")
    return value


def init_parallel(
    topology: Topology,
    rank: int,
    init_method: str | None = None,
    device: torch.device | str = "cpu",
    timeout_s: float | None = None,
) -> ParallelState:
    """Join the process group (nccl on cuda, gloo on cpu) and create one tp group per stage.

    `timeout_s` (None: `collective_timeout_s()`) bounds how long a collective or transfer may
    wait. Returns this rank's ParallelState. A world of one needs no process group and no
    init_method. Raises ValueError when the rank is outside the topology or init_method is
    missing.
    """
    import datetime

    timeout_s = collective_timeout_s() if timeout_s is None else timeout_s
    device = torch.device(device)
    if not 0 <= rank < topology.world_size:
        raise ValueError(f"rank must be in [0, {topology.world_size}) (got {rank})")
    if topology.world_size == 1:
        return ParallelState(topology, rank, None, device)
    if init_method is None:
        raise ValueError("init_method is required when tp * pp > 1, e.g. 'tcp://127.0.0.1:29500'")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=topology.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    tp_group = None
    for stage in range(topology.pp):  # every rank must create every group, in the same order
        group = dist.new_group(topology.stage_ranks(stage)) if topology.tp > 1 else None
        if stage == topology.stage_of(rank):
            tp_group = group
    state = ParallelState(topology, rank, tp_group, device)
    for stage in range(topology.pp - 1):  # one group per pair of neighbouring stages' tp ranks
        for tp_rank in range(topology.tp):
            pair = [topology.rank_of(stage, tp_rank), topology.rank_of(stage + 1, tp_rank)]
            group = dist.new_group(pair)
            if rank == pair[0]:
                state.next_group = group
            elif rank == pair[1]:
                state.prev_group = group
    if topology.pp > 1:
        pair = [topology.rank_of(topology.pp - 1, 0), topology.rank_of(0, 0)]
        group = dist.new_group(pair)
        if rank in pair:
            state.return_group = group
    return state


_current: contextvars.ContextVar[ParallelState | None] = contextvars.ContextVar(
    "energon_parallel_state", default=None
)


@contextlib.contextmanager
def use_parallel(state: ParallelState) -> Iterator[ParallelState]:
    """Make `state` what `current_parallel()` returns inside the block (layers built here shard)."""
    token = _current.set(state)
    try:
        yield state
    finally:
        _current.reset(token)


def current_parallel() -> ParallelState:
    """The state set by the innermost `use_parallel`; a single device (tp=1, pp=1) outside any."""
    state = _current.get()
    return state if state is not None else ParallelState()
