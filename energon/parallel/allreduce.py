"""The tensor-parallel all-reduce: one-shot over NVLink peer memory for small messages, NCCL above.

A decode step at small batch all-reduces a few KB twice per layer, and NCCL takes ~13 us for that
even inside a CUDA graph. `OneShotAllReduce` keeps one buffer in torch's symmetric memory: every
rank of the tp group maps every peer's copy, so one kernel puts this rank's message in its
buffer, meets the peers on flags in their buffers, reads all peers' messages over NVLink and sums
them. Larger messages (prefill), other dtypes and other devices go to `dist.all_reduce`.

- float16 (the presets' dtype) goes to energon's kernel (energon/kernels/one_shot.py): one
  meeting per call instead of torch's two, the row-parallel bias added in the same float32 sum
  (one rounding). On 2 H100s in a CUDA graph: 7.4 us per 10 KB message against NCCL's 13.5
  (`energon bench allreduce`). bfloat16 and float32 go to torch's kernels
  (`torch.ops.symm_mem.one_shot_all_reduce*`, 9.5 us): they take no float16, which they can
  only sum in float32 (`float16_in_float32`: cast in, one-shot, cast back), the way taken when
  triton is missing.
- Nothing on the fast path allocates or synchronises, so it can be captured in a CUDA graph (the
  decode graphs). Every rank must then issue the same calls in the same order, which the decode
  graphs do: they run the same steps on every rank.
- A one-shot kernel whose peer never arrives waits forever, so the fast path is turned on only
  once every rank of the group has allocated, mapped and checked it
  (energon/parallel/one_shot_setup.py, `enable_fast_all_reduce`). Otherwise every rank uses NCCL.
- Layers call `all_reduce(x, group, bias)`; `install_all_reduce` registers the group's fast
  path, which lives as long as the process (torch's symmetric memory is per process and group).
- A row-parallel layer's sum that goes straight into a residual add and a norm (a
  `PartialSum`, energon/parallel/partial_sum.py) is summed, added and normalised by one kernel
  (`add_norm`, energon/kernels/one_shot_norm.py) for float16 batches of up to 64 rows; with
  ENERGON_ALL_REDUCE_NORM=0 it takes the one-shot kernel and then the norm's.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from energon.parallel.topology import ParallelState

log = logging.getLogger("energon")

DEFAULT_MAX_BYTES = 512 << 10
MODES = ("auto", "nccl")
MODE_ENV = "ENERGON_ALL_REDUCE"
NORM_ENV = "ENERGON_ALL_REDUCE_NORM"  # "0": a sum and the norm after it as two kernels
PUSH_ENV = "ENERGON_ALL_REDUCE_PUSH"  # "0": the fused kernel pushes the rows, not the GEMV

# the dtype each message dtype is summed in by torch's kernels (bfloat16 and float32 only)
SUM_DTYPE = {
    torch.bfloat16: torch.bfloat16,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
}
ALIGN = 16  # bytes: the kernels' widest vector; the fused copy needs it on both tensors

_FAST_BY_GROUP: dict[dist.ProcessGroup, OneShotAllReduce] = {}


def all_reduce(
    x: torch.Tensor, group: dist.ProcessGroup, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Sums `x` over `group` in place, adds `bias` (broadcast over the last dimension) and
    returns it: the group's one-shot path when one is enabled and takes `x`, else
    `dist.all_reduce`."""
    fast = fast_all_reduce(group)
    if fast is not None:
        return fast(x, bias)
    return _nccl(x, group, bias)


def _nccl(x: torch.Tensor, group: dist.ProcessGroup, bias: torch.Tensor | None) -> torch.Tensor:
    """`dist.all_reduce` in place, then the bias."""
    dist.all_reduce(x, group=group)
    return x if bias is None else x.add_(bias)


class OneShotAllReduce:
    """Sum over one tp group: messages of at most `max_bytes` on `device` go through symmetric
    memory (`buffer`, rendezvoused over `group`), the rest to `dist.all_reduce`. bfloat16 and
    float32 by torch's kernels; float16 by energon's kernel when given its arguments (`peers`,
    from `own_kernel_args`), else summed in float32 by torch's when `float16_in_float32`;
    `norm_offset`: where the fused all-reduce + norm's region starts (`add_norm`), if any.

    `scratch` is ordinary memory of 2 * max_bytes (a multiple of 16; room for a float16 message
    summed in float32) for the staged paths; `buffer` starts with as many bytes for torch's
    kernels, followed by energon's kernel's part when it has one; `handle` is the buffer's
    rendezvous. Build it with one_shot_setup.set_up_one_shot, which checks it on every rank.
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
        peers: tuple | None = None,
        norm_offset: int | None = None,
    ):
        torch_bytes = scratch.numel()  # torch's kernels use the buffer's first bytes
        if torch_bytes < 2 * max_bytes or buffer.numel() < torch_bytes or torch_bytes % ALIGN:
            raise ValueError(
                f"buffer and scratch need {2 * max_bytes} bytes, scratch a multiple of {ALIGN} "
                f"(got {buffer.numel()}, {torch_bytes})"
            )
        self.group = group
        self.group_name = group.group_name
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.buffer = buffer
        self.handle = handle  # torch's mapping of the peers' buffers, kept with the buffer
        self._symm = {d: buffer[:torch_bytes].view(d) for d in set(SUM_DTYPE.values())}
        self._scratch = {d: scratch.view(d) for d in SUM_DTYPE}
        # float16 goes to energon's kernel (energon/kernels/one_shot.py) given its arguments
        self.own_kernel = peers is not None
        self._peers = peers
        # the messages it takes, in SUM_DTYPE's order: the same on every rank (a set of dtypes
        # iterates in an order of its own in each process, and the set-up probes in this order)
        self.dtypes = tuple(
            d for d in SUM_DTYPE if d is not torch.float16 or float16_in_float32 or self.own_kernel
        )
        self._fused = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
        # where the region of energon's fused all-reduce + add + norm starts in the buffer
        # (energon/kernels/one_shot_norm.py), when it has one
        self.norm_offset = norm_offset if peers is not None else None
        self.one_shot_calls = 0  # calls issued (a captured call counts once, at capture)
        self.norm_calls = 0  # of them, fused with the norm after them
        self.push_calls = 0  # of those, rows the GEMV before pushed (`push_for`)
        self.nccl_calls = 0
        self.error: str | None = None  # why the fast path was turned off after set-up

    def takes(self, x: torch.Tensor) -> bool:
        """Whether `x` goes the one-shot way (the same answer on every rank for the same call)."""
        return x.device == self.device and self._small(x.numel() * x.element_size(), x.dtype)

    def _small(self, nbytes: int, dtype: torch.dtype) -> bool:
        """Whether a message of `nbytes` in `dtype` goes the one-shot way."""
        return 0 < nbytes <= self.max_bytes and dtype in self.dtypes

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Sums `x` over the group in place (as `dist.all_reduce` does), adds `bias` (broadcast
        over the last dimension; energon's kernel fuses it) and returns it."""
        if self.takes(x):
            try:
                self.one_shot(x, bias)
                self.one_shot_calls += 1
                return x
            except RuntimeError as exc:
                # torch's argument checks fail before any launch, alike on every rank (same
                # shapes and dtypes), so every rank takes NCCL from here on
                self._turn_off(exc)
        self.nccl_calls += 1
        return _nccl(x, self.group, bias)

    def one_shot(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """The fast path for a message of a dtype in `dtypes` and at most `max_bytes`: `x`
        becomes the sum over the group (+ bias).

        float16 with `own_kernel`: one kernel, bias included (`x` staged through scratch when
        not contiguous). Else torch's: one kernel when `x` is contiguous, 16-byte aligned and
        summed in its own dtype; else `x` is staged into the buffer (cast where needed), summed
        into scratch and copied back; then the bias is added."""
        if self.own_kernel and x.dtype == torch.float16:
            if x.is_contiguous():
                self._own_sum(x, x, bias)
            else:
                staged = self._scratch[torch.float16][: x.numel()].view(x.shape)
                staged.copy_(x)
                self._own_sum(staged, staged, bias)
                x.copy_(staged)
            return
        self._torch_one_shot(x)
        if bias is not None:
            x.add_(bias)

    def add_norm(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
        weight: torch.Tensor | None,
        norm_bias: torch.Tensor | None,
        eps: float,
        rms: bool,
        pushed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(normed, summed) by one kernel: summed = the sum of `x` over the group + bias (+
        residual), normed = its LayerNorm (RMSNorm when `rms`) by weight and norm_bias. None
        when that kernel does not take the call (the caller sums and normalises as before):
        not float16, over 64 rows or `max_bytes`, ENERGON_ALL_REDUCE_NORM=0. The answer
        depends on shapes and dtypes only, alike on every rank. `x` is left as it was.
        `pushed`: the GEMV that computed `x` pushed its rows already (`push_for`); a call this
        kernel does not take must then go to `pushed_sum`, whatever else."""
        if os.environ.get(NORM_ENV, "1") == "0":
            return None
        result = self.fused_add_norm(x, bias, residual, weight, norm_bias, eps, rms, pushed)
        if result is not None:
            self.one_shot_calls += 1
            self.norm_calls += 1
            self.push_calls += pushed
        return result

    def fused_add_norm(
        self, x, bias, residual, weight, norm_bias, eps, rms, pushed=False
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`add_norm` whatever ENERGON_ALL_REDUCE_NORM says, not counted (the set-up checks
        it so)."""
        if self.norm_offset is None or not self.takes(x):
            return None
        from energon.kernels import one_shot_norm

        if not one_shot_norm.takes(x, residual, weight, norm_bias, bias):
            return None
        return self._own_add_norm(x, bias, residual, weight, norm_bias, eps, rms, pushed)

    def push_for(self, rows: int, width: int, dtype: torch.dtype):
        """Where a row-parallel layer's GEMV of `rows` x `width` pushes its product for the
        fused all-reduce + norm (a `one_shot_norm.Push`, energon/kernels/gemv_tma.py), or None
        when that kernel would not take it: the fused path off (ENERGON_ALL_REDUCE_NORM=0,
        ENERGON_ALL_REDUCE_PUSH=0, no region), over `max_bytes`, not float16, over 64 rows.
        Shapes and dtypes only, alike on every rank: every rank pushes, or none."""
        if self.norm_offset is None or "0" in (os.environ.get(PUSH_ENV), os.environ.get(NORM_ENV)):
            return None
        from energon.kernels import one_shot_norm

        if not self._small(rows * width * dtype.itemsize, dtype):
            return None
        return self._push_target() if one_shot_norm.fits(dtype, rows, width) else None

    def _push_target(self):
        """The Push of energon's fused kernel's region on this rank."""
        from energon.kernels import one_shot_norm

        table, rank, world, *_ = self._peers
        return one_shot_norm.Push(table.data_ptr(), rank, world, self.norm_offset)

    def pushed_sum(
        self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The sum over the group (+ bias) (+ residual, shaped like `x`) of rows the GEMV
        pushed (`push_for`) when no norm takes them: the fused kernel's sum alone (no norm)."""
        self.one_shot_calls += 1
        self.push_calls += 1
        return self._own_add_norm(x, bias, residual, None, None, 1e-5, False, True, False)[1]

    def _own_add_norm(
        self, x, bias, residual, weight, norm_bias, eps, rms, pushed=False, normalised=True
    ):
        """Energon's fused kernel: (normed, summed); normed None unless `normalised`."""
        from energon.kernels.one_shot_norm import one_shot_add_norm

        table, rank, world, *_ = self._peers
        return one_shot_add_norm(
            x,
            residual,
            weight,
            norm_bias,
            eps,
            rms,
            bias,
            table.data_ptr(),
            rank,
            world,
            self.norm_offset,
            pushed,
            normalised,
        )

    def _torch_one_shot(self, x: torch.Tensor) -> None:
        n = x.numel()
        wide = SUM_DTYPE[x.dtype]
        size = wide.itemsize
        aligned = (
            self._fused
            and wide == x.dtype
            and x.is_contiguous()
            and (n * size) % ALIGN == 0
            and x.data_ptr() % ALIGN == 0
            and (x.storage_offset() * size) % ALIGN == 0
        )
        if aligned:
            flat = x.view(-1)
            self._copy_and_sum(self._symm[wide][:n], flat)
            return
        padded = -(-n * size // ALIGN) * ALIGN // size  # the kernels want whole 16-byte rows
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

    def _own_sum(self, x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Energon's kernel: out = the sum of every rank's x (+ bias)."""
        from energon.kernels.one_shot import one_shot_sum

        table, *layout = self._peers
        one_shot_sum(x, out, table.data_ptr(), *layout, bias=bias)

    def _turn_off(self, exc: Exception) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.max_bytes = 0
        log.warning("energon: one-shot all-reduce failed, using NCCL from now on (%s)", exc)

    def describe(self) -> str:
        """One line: what goes which way."""
        if self.max_bytes == 0:
            return f"nccl: one-shot turned off after set-up ({self.error})"
        names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
        if self.own_kernel:
            fused = ""
            if self.norm_offset is not None:
                fused = ", fused with the norm after it"
                if os.environ.get(NORM_ENV, "1") == "0":
                    fused = f", the norm after it apart: {NORM_ENV}=0"
            names += f" (float16 by energon's kernel{fused})"
        elif torch.float16 in self.dtypes:
            names += " (float16 summed in float32)"
        return (
            f"one-shot (torch symmetric memory) up to {self.max_bytes} bytes of {names}; "
            f"nccl for the rest"
        )


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
