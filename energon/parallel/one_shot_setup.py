"""Setting up the one-shot all-reduce (energon/parallel/allreduce.py) on every rank of a tp group.

A one-shot kernel whose peer never arrives waits forever, so `set_up_one_shot` turns the fast
path on only when every rank has allocated its buffers, mapped its peers' and checked the sums
(eagerly and replayed from a CUDA graph); each step ends in a vote over the group (`_Vote`), so no
rank launches a kernel that a peer will not join. Any failed step leaves every rank on NCCL.

- The set-up used to hang at random (every rank stuck in its checks; on 4 H100s three of four
  times): it probed one message per dtype in the order of a Python set of dtypes, which differs
  between processes, so rank 0's float32 probe met rank 1's bfloat16 one. A fast path's
  `dtypes` is now a tuple in SUM_DTYPE's order: every rank issues the same collectives in the
  same order.
- Should a check's kernels still not finish, the checks wait for the device at most
  `CHECK_TIMEOUT` seconds, then raise `OneShotStuck`, which names the way around it.
- `enable_fast_all_reduce(state)` is what a worker calls, once, after `init_parallel`:
  ENERGON_ALL_REDUCE=nccl (or mode "nccl") keeps NCCL.
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import torch
import torch.distributed as dist

from energon.parallel.allreduce import (
    ALIGN,
    DEFAULT_MAX_BYTES,
    MODE_ENV,
    MODES,
    OneShotAllReduce,
    install_all_reduce,
)
from energon.parallel.topology import NO_MULTICAST_ENV, ParallelState

log = logging.getLogger("energon")

CHECK_TIMEOUT = 30.0  # seconds a set-up check waits for its kernels


class OneShotStuck(RuntimeError):
    """A set-up check's one-shot kernels did not finish: the device is stuck in them for good,
    so this process cannot go on (nor vote, behind them); never caught by the set-up."""


def own_kernel_args(handle, buffer: torch.Tensor, data_offset: int, half_bytes: int) -> tuple:
    """(table of buffer addresses, rank, world size, data_offset, half_bytes) for energon's
    kernel: the peers' buffers as torch maps them (checked to start where this rank's `buffer`
    does), their addresses in a device tensor."""
    world, rank = handle.world_size, handle.rank
    starts = [handle.get_buffer(r, (buffer.numel(),), torch.uint8).data_ptr() for r in range(world)]
    if starts[rank] != buffer.data_ptr():
        raise RuntimeError("symmetric buffer mapped at an offset: energon's kernel cannot use it")
    table = torch.tensor(starts, dtype=torch.int64, device=buffer.device)
    return table, rank, world, data_offset, half_bytes


class _Vote:
    """Each set-up step ends in a vote over the group: a step counts only if it worked on every
    rank, so no rank ever launches a one-shot kernel that a peer will not join."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.device = group, device
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)

    def __call__(self, step: str, why: str | None) -> str | None:
        """None when `step` worked on every rank; else why not (this rank's reason, or which
        ranks failed)."""
        failed = torch.zeros(self.size, dtype=torch.int32, device=self.device)
        failed[self.rank] = int(why is not None)
        dist.all_reduce(failed, group=self.group)
        ranks = [r for r, f in enumerate(failed.tolist()) if f]
        if not ranks:
            return None
        return f"{step}: {why}" if why is not None else f"{step} failed on tp rank(s) {ranks}"


def _attempt(fn, *args) -> str | None:
    """None when fn(*args) ran, else why it raised (OneShotStuck goes on up)."""
    try:
        fn(*args)
    except OneShotStuck:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means NCCL, with the reason kept
        return f"{type(exc).__name__}: {exc}"
    return None


def wait_until(done, timeout: float, what: str) -> None:
    """Returns once `done()` is true; raises OneShotStuck after `timeout` seconds. Polls every
    millisecond: it runs once, at start-up, on a worker's own thread."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise OneShotStuck(
                f"{what} did not finish in {timeout:.0f} s: the GPU is stuck in its one-shot "
                f"kernels (at their barrier, waiting for a peer); start again, or set "
                f"{MODE_ENV}=nccl"
            )
        time.sleep(1e-3)


def _pattern(n: int, dtype: torch.dtype, rank: int, device: torch.device) -> torch.Tensor:
    """(rank + 1) * (i % 7 + 1) / 4: small multiples of 1/4, so every sum is exact in bf16."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    return ((rank + 1) * (i % 7 + 1) / 4).to(dtype)


def _probes(fast: OneShotAllReduce, rank: int) -> list[torch.Tensor]:
    """Messages that take each path: fused (aligned) and staged (odd length), per dtype, in the
    same order on every rank (`fast.dtypes` is ordered: every rank must issue the same
    collectives in the same order)."""
    return [_pattern(n, d, rank, fast.device) for d in fast.dtypes for n in (4096, 1001)]


def _check_sums(probes: list[torch.Tensor], size: int) -> None:
    """Raises RuntimeError unless each reduced probe holds the sum over `size` ranks;
    OneShotStuck when their kernels do not finish in CHECK_TIMEOUT seconds."""
    finished = torch.cuda.Event()
    finished.record()
    wait_until(finished.query, CHECK_TIMEOUT, "the one-shot all-reduce check")
    total = size * (size + 1) // 2
    for x in probes:
        if not torch.equal(x, _pattern(x.numel(), x.dtype, 0, x.device) * total):
            raise RuntimeError(f"wrong one-shot sums ({x.dtype}, {x.numel()} elements)")


NORM_PROBE = (3, 5120)  # rows, width: a decode step's all-reduce + norm


def _norm_probe(fast: OneShotAllReduce, rank: int) -> dict:
    """Arguments of a fused all-reduce + RMSNorm (`fused_add_norm`), when `fast` has one."""
    if fast.norm_offset is None:
        return {}
    n, dev, f16 = NORM_PROBE[0] * NORM_PROBE[1], fast.device, torch.float16
    return {
        "x": _pattern(n, f16, rank, dev).view(NORM_PROBE),
        "residual": _pattern(n, f16, 0, dev).view(NORM_PROBE),
        "weight": torch.full(NORM_PROBE[1:], 0.5, dtype=f16, device=dev),
    }


def _run_norm_probe(fast: OneShotAllReduce, probe: dict) -> tuple | None:
    if not probe:
        return None
    args = probe["x"], None, probe["residual"], probe["weight"], None, 1e-6, True
    out = fast.fused_add_norm(*args)
    if out is None:
        raise RuntimeError("the fused all-reduce + norm refused its probe")
    return out


def _check_norm(result: tuple | None, probe: dict, size: int) -> None:
    """Raises RuntimeError unless the probe's sum is exact and its RMSNorm close to eager's."""
    if result is None:
        return
    normed, summed = result
    total = size * (size + 1) // 2 + 1  # every rank's x, and the residual
    want = probe["residual"] * total
    if not torch.equal(summed, want):
        raise RuntimeError("wrong sums from the fused all-reduce + norm")
    h = want.float()
    eager = probe["weight"] * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).half()
    if not torch.allclose(normed.float(), eager.float(), rtol=1e-2, atol=1e-2):
        raise RuntimeError("wrong norms from the fused all-reduce + norm")


def _check_eagerly(fast: OneShotAllReduce, rank: int, size: int) -> None:
    probes, norm = _probes(fast, rank), _norm_probe(fast, rank)
    for x in probes:
        fast.one_shot(x)
    normed = _run_norm_probe(fast, norm)
    _check_sums(probes, size)
    _check_norm(normed, norm, size)


def _capture(graph: torch.cuda.CUDAGraph, fast: OneShotAllReduce, probes, norm) -> tuple | None:
    """Captures the probes' sums and the norm probe's; returns the latter's static outputs."""
    with torch.cuda.graph(graph):
        for x in probes:
            fast.one_shot(x)
        return _run_norm_probe(fast, norm)


def _replay_and_check(graph, probes, norm, normed, rank: int, size: int) -> None:
    for x in probes:
        x.copy_(_pattern(x.numel(), x.dtype, rank, x.device))
    for out in normed or ():
        out.zero_()  # so that only the replay can have put the right values there
    graph.replay()
    _check_sums(probes, size)
    _check_norm(normed, norm, size)


def symmetric_memory():
    """torch's symmetric memory module, NVLink multicast off first (on shared hosts a program
    using it can put the GPUs out of service)."""
    os.environ.update(NO_MULTICAST_ENV)
    import torch.distributed._symmetric_memory as symm_mem

    return symm_mem


def _unsupported(device: torch.device) -> str | None:
    """Why this process cannot try the one-shot path, or None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs cuda (device {device})"
    try:
        symmetric_memory()
        torch.ops.symm_mem.one_shot_all_reduce_out  # noqa: B018 - registered in this torch?
    except (ImportError, AttributeError, RuntimeError) as exc:
        return f"torch {torch.__version__} lacks symmetric memory ops ({exc})"
    return None


def _import_own_kernel() -> None:
    """Raises ImportError when energon's kernel (triton) cannot load here."""
    import energon.kernels.one_shot  # noqa: F401


def _own_kernel_layout(data_offset: int, half_bytes: int, world: int) -> tuple[int, int]:
    """(where the fused all-reduce + norm's region starts, the buffer's whole size) when
    energon's one-shot kernel's part starts at `data_offset`: that part, then the region."""
    from energon.kernels.one_shot import control_bytes
    from energon.kernels.one_shot_norm import region_bytes

    norm_offset = data_offset + -(-control_bytes(half_bytes, world) // ALIGN) * ALIGN
    return norm_offset, norm_offset + region_bytes(world)


def _map_buffer(
    group: dist.ProcessGroup,
    device: torch.device,
    nbytes: int,
    into: list,
    norm_offset: int | None = None,
) -> None:
    """Appends (symmetric buffer, handle) to `into`: allocated, zeroed (the fused all-reduce +
    norm's region at `norm_offset` made ready for the peers' pushes), rendezvoused once that is
    done on the device."""
    symm_mem = symmetric_memory()
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11):
        with warnings.catch_warnings():  # required before torch 2.11, deprecated since
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group.group_name)
    buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    buffer.zero_()
    if norm_offset is not None:
        from energon.kernels.one_shot_norm import prepare_region

        prepare_region(buffer, norm_offset, dist.get_world_size(group))
    torch.cuda.synchronize(device)  # before any peer can reach this buffer
    handle = symm_mem.rendezvous(buffer, group.group_name)
    if handle.world_size != dist.get_world_size(group):
        raise RuntimeError(f"rendezvous joined {handle.world_size} ranks, not the whole group")
    into.append((buffer, handle))


def set_up_one_shot(
    group: dist.ProcessGroup,
    device: torch.device | str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    refuse: str | None = None,
    float16_in_float32: bool = False,
) -> tuple[OneShotAllReduce | None, str]:
    """Collective: every rank of `group` calls it with the same arguments, outside any graph
    capture. Returns (the fast all-reduce, its description) once it is set up and checked on
    every rank (eagerly and replayed from a CUDA graph), else (None, why not). A rank passing
    `refuse` (a reason) votes no. Never raises for a failed step; when a peer fails inside
    torch's rendezvous, the others may wait for the store's timeout first."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    vote = _Vote(group, device)
    rank, size = vote.rank, vote.size
    if why := vote("check", refuse or _unsupported(device)):
        return None, why
    half = -(-max_bytes // ALIGN) * ALIGN
    own = vote("energon's kernel", _attempt(_import_own_kernel)) is None
    # torch's kernels' part of the buffer, then (own) energon's kernels', zeroed alike
    norm_offset, nbytes = _own_kernel_layout(2 * half, half, size) if own else (None, 2 * half)
    made: list = []
    why = _attempt(lambda: made.append(torch.empty(2 * half, dtype=torch.uint8, device=device)))
    if why := vote("scratch", why):
        return None, why
    why = _attempt(_map_buffer, group, device, nbytes, made, norm_offset)
    if why := vote("rendezvous", why):
        return None, why
    scratch, (buffer, handle) = made
    peers: list = []
    if own:
        why = _attempt(lambda: peers.append(own_kernel_args(handle, buffer, 2 * half, half)))
        if why := vote("peer addresses", why):
            return None, why
    fast = OneShotAllReduce(
        group,
        device,
        max_bytes,
        buffer,
        scratch,
        handle,
        float16_in_float32,
        peers=peers[0] if peers else None,
        norm_offset=norm_offset,
    )
    if why := vote("eager check", _attempt(_check_eagerly, fast, rank, size)):
        return None, why
    graph, probes, norm = torch.cuda.CUDAGraph(), _probes(fast, rank), _norm_probe(fast, rank)
    captured: list = []
    why = _attempt(lambda: captured.append(_capture(graph, fast, probes, norm)))
    if why := vote("graph capture", why):
        return None, why
    replay = _attempt(_replay_and_check, graph, probes, norm, captured[0], rank, size)
    if why := vote("graph replay", replay):
        return None, why
    return fast, fast.describe()


def enable_fast_all_reduce(
    state: ParallelState,
    mode: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    float16_in_float32: bool = False,
    dtype: torch.dtype | None = None,
) -> str:
    """Sets up the one-shot all-reduce of `state`'s tp group for the layers (`fast_all_reduce`
    then returns it). Collective over the tp group on cuda: call it on every rank, once,
    after `init_parallel`, with the same arguments. `mode`: "auto" tries it, "nccl" keeps NCCL;
    None reads env ENERGON_ALL_REDUCE (default auto). `float16_in_float32`: float16 messages
    in float32 when energon's kernel cannot load. `dtype`: the activations' dtype, when known;
    float16 ones skip the set-up when neither can sum them. Returns one line on what all-reduces
    use, and logs a warning when "auto" fell back to NCCL. Raises ValueError for another mode,
    OneShotStuck when a check's kernels never finish.
    """
    mode = mode or os.environ.get(MODE_ENV) or "auto"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)} (got {mode!r})")
    group = state.tp_group
    if group is None:
        return "none: tp=1"
    if dtype == torch.float16 and not float16_in_float32 and _attempt(_import_own_kernel):
        return f"{dist.get_backend(group)}: float16 activations and no triton for energon's kernel"
    if state.device.type != "cuda":
        return f"{dist.get_backend(group)}: one-shot needs cuda (device {state.device})"
    refuse = f"{MODE_ENV}=nccl" if mode == "nccl" else None
    fast, line = set_up_one_shot(group, state.device, max_bytes, refuse, float16_in_float32)
    install_all_reduce(state, fast)
    if fast is None:
        if mode == "auto":
            log.warning("energon: one-shot all-reduce unavailable, using NCCL (%s)", line)
        return f"nccl: {line}"
    return line
