"""The tensor-parallel all-reduce: one-shot over NVLink peer memory for small messages, NCCL above.

A decode step at small batch all-reduces a few KB twice per layer, and NCCL takes ~15 us for that
even inside a CUDA graph. `OneShotAllReduce` keeps one buffer in torch's symmetric memory: every
rank of the tp group maps every peer's copy, so one kernel (`torch.ops.symm_mem.one_shot_all_reduce*`)
puts this rank's message in its buffer, waits at a barrier on the peers' signal pads, reads all
peers' messages over NVLink and sums them. Larger messages (prefill), other dtypes and other devices
go to `dist.all_reduce`.

- torch's reduce kernels take bfloat16 and float32 only. float16 messages can be summed in
  float32 (`float16_in_float32`: cast into the buffer, one-shot, cast back: two more kernels; for
  two ranks the float16 sum NCCL gives), but on 2 H100s that was no faster than NCCL inside a
  graph and slower eagerly, so by default float16 goes to NCCL (`energon bench allreduce`).
- Nothing on the fast path allocates or synchronises, so it can be captured in a CUDA graph (the
  decode graphs). Every rank must then replay the same graphs the same number of times, which the
  decode graphs do: they run the same steps on every rank.
- A one-shot kernel whose peer never arrives waits forever, so `set_up_one_shot` turns the fast
  path on only when every rank of the group has allocated, mapped and checked it (eagerly and in a
  captured graph); each step ends in a vote over the group. Otherwise every rank uses NCCL.
- On 4 H100s a set-up check's kernels sometimes never finished (every rank waited for them
  after a clean rendezvous and vote; three of four times that a second or third Engine started
  in one program): the checks wait for the device at most `CHECK_TIMEOUT` seconds, then
  raise `OneShotStuck`, which names the way around it, instead of hanging the start-up. A model
  whose activations are float16 skips the set-up (`dtype`): the kernels would not take them.
- Layers call `all_reduce(x, group)`; `enable_fast_all_reduce` registers the group's fast path,
  which lives as long as the process (torch's symmetric memory is per process and group, too).
"""

from __future__ import annotations

import logging
import os
import time
import warnings

import torch
import torch.distributed as dist

from energon.parallel.topology import NO_MULTICAST_ENV, ParallelState

log = logging.getLogger("energon")

DEFAULT_MAX_BYTES = 512 << 10
MODES = ("auto", "nccl")
MODE_ENV = "ENERGON_ALL_REDUCE"

# the dtype each message dtype is summed in by torch's kernels (bfloat16 and float32 only)
SUM_DTYPE = {
    torch.bfloat16: torch.bfloat16,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
}
_ALIGN = 16  # bytes: the kernels' widest vector; the fused copy needs it on both tensors

CHECK_TIMEOUT = 30.0  # seconds a set-up check waits for its kernels

_FAST_BY_GROUP: dict[dist.ProcessGroup, OneShotAllReduce] = {}


class OneShotStuck(RuntimeError):
    """A set-up check's one-shot kernels did not finish: the device is stuck in them for good,
    so this process cannot go on (nor vote, behind them); never caught by the set-up."""


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Sums `x` over `group` in place and returns it: the group's one-shot path when one is
    enabled and takes `x`, else `dist.all_reduce`."""
    fast = fast_all_reduce(group)
    if fast is not None:
        return fast(x)
    dist.all_reduce(x, group=group)
    return x


class OneShotAllReduce:
    """Sum over one tp group: bfloat16 and float32 messages (and float16 ones, summed in float32,
    when `float16_in_float32`) of at most `max_bytes` on `device` go through symmetric memory
    (`buffer`, rendezvoused over `group`), the rest to `dist.all_reduce`.

    `buffer` and `scratch` are byte tensors of 2 * max_bytes (room for a float16 message summed
    in float32); `scratch` is ordinary memory for the staged path's output; `handle` is the
    buffer's rendezvous. Build it with `set_up_one_shot`, which checks it on every rank first.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        device: torch.device,
        max_bytes: int,
        buffer: torch.Tensor,
        scratch: torch.Tensor,
        handle=None,
        float16_in_float32: bool = False,
    ):
        if buffer.numel() < 2 * max_bytes or scratch.numel() < buffer.numel():
            raise ValueError(
                f"buffer and scratch need {2 * max_bytes} bytes (got {buffer.numel()}, "
                f"{scratch.numel()})"
            )
        self.group = group
        self.group_name = group.group_name
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.buffer = buffer
        self.handle = handle  # torch's mapping of the peers' buffers, kept with the buffer
        wide = set(SUM_DTYPE.values())
        self._symm = {d: buffer.view(d) for d in wide}
        self._scratch = {d: scratch.view(d) for d in wide}
        self.dtypes = set(SUM_DTYPE) if float16_in_float32 else wide  # the messages it takes
        self._fused = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
        self.one_shot_calls = 0  # calls issued (a captured call counts once, at capture)
        self.nccl_calls = 0
        self.error: str | None = None  # why the fast path was turned off after set-up

    def takes(self, x: torch.Tensor) -> bool:
        """Whether `x` goes the one-shot way (the same answer on every rank for the same call)."""
        return (
            0 < x.numel() * x.element_size() <= self.max_bytes
            and x.dtype in self.dtypes
            and x.device == self.device
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sums `x` over the group in place (as `dist.all_reduce` does) and returns it."""
        if self.takes(x):
            try:
                self.one_shot(x)
                self.one_shot_calls += 1
                return x
            except RuntimeError as exc:
                # torch's argument checks fail before any launch, alike on every rank (same
                # shapes and dtypes), so every rank takes NCCL from here on
                self._turn_off(exc)
        dist.all_reduce(x, group=self.group)
        self.nccl_calls += 1
        return x

    def one_shot(self, x: torch.Tensor) -> None:
        """The fast path for a message of a dtype in SUM_DTYPE and at most `max_bytes`: `x`
        becomes the sum over the group.

        One kernel when `x` is contiguous, 16-byte aligned and summed in its own dtype; else `x`
        is staged into the buffer (cast where needed), summed into scratch and copied back."""
        n = x.numel()
        wide = SUM_DTYPE[x.dtype]
        size = wide.itemsize
        aligned = (
            self._fused
            and wide == x.dtype
            and x.is_contiguous()
            and (n * size) % _ALIGN == 0
            and x.data_ptr() % _ALIGN == 0
            and (x.storage_offset() * size) % _ALIGN == 0
        )
        if aligned:
            flat = x.view(-1)
            self._copy_and_sum(self._symm[wide][:n], flat)
            return
        padded = -(-n * size // _ALIGN) * _ALIGN // size  # the kernels want whole 16-byte rows
        stage, out = self._symm[wide][:padded], self._scratch[wide][:padded]
        stage[:n].view(x.shape).copy_(x)
        self._sum(stage, out)
        x.copy_(out[:n].view(x.shape))

    # the two kernels (tests on cpu replace them with gloo stand-ins)

    def _copy_and_sum(self, symm: torch.Tensor, x: torch.Tensor) -> None:
        """One kernel: x into symm, barrier, x = the sum of every rank's symm."""
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, x, "sum", self.group_name, x)

    def _sum(self, symm: torch.Tensor, out: torch.Tensor) -> None:
        """One kernel: barrier, out = the sum of every rank's symm."""
        torch.ops.symm_mem.one_shot_all_reduce_out(symm, "sum", self.group_name, out)

    def _turn_off(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.max_bytes = 0
        log.warning("energon: one-shot all-reduce failed, using NCCL from now on (%s)", exc)

    def describe(self) -> str:
        """One line: what goes which way."""
        if self.max_bytes == 0:
            return f"nccl: one-shot turned off after set-up ({self.error})"
        names = ", ".join(str(d).removeprefix("torch.") for d in SUM_DTYPE if d in self.dtypes)
        if torch.float16 in self.dtypes:
            names += " (float16 summed in float32)"
        return (
            f"one-shot (torch symmetric memory) up to {self.max_bytes} bytes of {names}; "
            f"nccl for the rest"
        )


# ------------------------------------------------------------------------------------ set-up


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
    """Messages that take each path: fused (aligned) and staged (odd length), per dtype."""
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


def _check_eagerly(fast: OneShotAllReduce, rank: int, size: int) -> None:
    probes = _probes(fast, rank)
    for x in probes:
        fast.one_shot(x)
    _check_sums(probes, size)


def _capture(graph: torch.cuda.CUDAGraph, fast: OneShotAllReduce, probes) -> None:
    with torch.cuda.graph(graph):
        for x in probes:
            fast.one_shot(x)


def _replay_and_check(graph, probes, rank: int, size: int) -> None:
    for x in probes:
        x.copy_(_pattern(x.numel(), x.dtype, rank, x.device))
    graph.replay()
    _check_sums(probes, size)


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


def _map_buffer(group: dist.ProcessGroup, device: torch.device, nbytes: int, into: list) -> None:
    """Appends (symmetric buffer, handle) to `into`: allocated, zeroed, rendezvoused."""
    symm_mem = symmetric_memory()
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11):
        with warnings.catch_warnings():  # required before torch 2.11, deprecated since
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group.group_name)
    buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    buffer.zero_()
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
    nbytes = 2 * (-(-max_bytes // _ALIGN) * _ALIGN)
    made: list = []
    why = _attempt(lambda: made.append(torch.empty(nbytes, dtype=torch.uint8, device=device)))
    if why := vote("scratch", why):
        return None, why
    why = _attempt(_map_buffer, group, device, nbytes, made)
    if why := vote("rendezvous", why):
        return None, why
    scratch, (buffer, handle) = made
    fast = OneShotAllReduce(group, device, max_bytes, buffer, scratch, handle, float16_in_float32)
    if why := vote("eager check", _attempt(_check_eagerly, fast, rank, size)):
        return None, why
    graph, probes = torch.cuda.CUDAGraph(), _probes(fast, rank)
    if why := vote("graph capture", _attempt(_capture, graph, fast, probes)):
        return None, why
    if why := vote("graph replay", _attempt(_replay_and_check, graph, probes, rank, size)):
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
    too (see the module's docstring). `dtype`: the activations' dtype, when known; float16
    ones (without float16_in_float32) skip the set-up. Returns one line on what all-reduces
    use, and logs a warning when "auto" fell back to NCCL. Raises ValueError for another mode,
    OneShotStuck when a check's kernels never finish.
    """
    mode = mode or os.environ.get(MODE_ENV) or "auto"
    if mode not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)} (got {mode!r})")
    group = state.tp_group
    if group is None:
        return "none: tp=1"
    if dtype == torch.float16 and not float16_in_float32:
        return f"{dist.get_backend(group)}: float16 activations (one-shot sums bfloat16, float32)"
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


def install_all_reduce(state: ParallelState, fast: OneShotAllReduce | None) -> None:
    """Makes `fast` the all-reduce of `state`'s tp group, for its layers; None goes back to
    NCCL / gloo (buffers are freed once no graph holds them)."""
    if fast is None:
        _FAST_BY_GROUP.pop(state.tp_group, None)
    else:
        _FAST_BY_GROUP[state.tp_group] = fast


def fast_all_reduce(group: dist.ProcessGroup | None) -> OneShotAllReduce | None:
    """The one-shot all-reduce the layers use for `group`, or None (NCCL / gloo)."""
    return _FAST_BY_GROUP.get(group)
