"""A row-parallel layer's output before its all-reduce, so that the norm after it can sum it.

At tp > 1 a `RowParallelLinear` returns `PartialSum(partial, bias, group)`: this rank's partial
product and the layer's bias, not yet summed over the tp group. In every decoder layer that sum
goes straight into a residual add and a norm (`norm.add_norm(attn_out, residual)`, or the next
layer's first norm), and there (`fused_or_summed`) the group's one-shot all-reduce sums it, adds
the bias and the residual and normalises the rows in one kernel where an all-reduce and an
add+norm were two (energon/kernels/one_shot_norm.py; float16 decode batches on CUDA). Anything
else takes the sum:
`sum()`, or `+` with a tensor, by the all-reduce as before. The model files do not change: a
layer's output, summed or not, goes where it went.

When the fused kernel will sum it, the layer's GEMV pushes its product into every rank's slots
itself, tile by tile (`pushed`: energon/kernels/gemv_tma.py, `OneShotAllReduce.push_for`), and
the kernel only waits for the rows. Every rank then pushed, so the rows are summed by that
kernel whoever takes them: the norm's `add_norm`, `sum()` and `+` (`pushed_sum`; `+` a tensor
of its shape is added in the same kernel, as the last layer's output and its residual are).
Once taken, the push is spent: a second use sums `partial` by the all-reduce.
"""

from __future__ import annotations

import torch

from energon.parallel.allreduce import all_reduce, fast_all_reduce


class PartialSum:
    """`partial` summed over `group`, plus `bias`: what `sum()` returns (once; the all-reduce
    runs in place on `partial`, so the sum is kept). `pushed`: the GEMV pushed `partial` into
    the group's fused all-reduce + norm (module docstring)."""

    __slots__ = ("partial", "bias", "group", "pushed", "_sum")

    def __init__(self, partial: torch.Tensor, bias: torch.Tensor | None, group, pushed=False):
        self.partial, self.bias, self.group, self.pushed = partial, bias, group, pushed
        self._sum: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.partial.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.partial.dtype

    @property
    def device(self) -> torch.device:
        return self.partial.device

    def sum(self) -> torch.Tensor:
        """The all-reduced tensor (+ bias)."""
        if self._sum is None:
            if self.take_push():
                self._sum = fast_all_reduce(self.group).pushed_sum(self.partial, self.bias)
            else:
                self._sum = all_reduce(self.partial, self.group, self.bias)
        return self._sum

    def take_push(self) -> bool:
        """Whether the rows were pushed and not yet summed; the caller sums them now."""
        pushed, self.pushed = self.pushed, False
        return pushed

    def __add__(self, other):
        if self._sum is None and self.pushed and _like(other, self.partial) and self.take_push():
            return fast_all_reduce(self.group).pushed_sum(self.partial, self.bias, other)
        return self.sum() + other

    __radd__ = __add__  # float addition commutes: `other + sum` is `sum + other`, bit for bit

    def __repr__(self) -> str:
        return f"PartialSum({tuple(self.shape)}, {self.dtype}, summed={self._sum is not None})"


def _like(other, partial: torch.Tensor) -> bool:
    """Whether `other` is a tensor the fused kernel adds to `partial`'s sum as its residual."""
    return (
        isinstance(other, torch.Tensor)
        and other.shape == partial.shape
        and other.dtype == partial.dtype
        and other.device == partial.device
        and other.dim() == 2
        and other.stride(-1) == 1
    )


def summed(x: torch.Tensor | PartialSum) -> torch.Tensor:
    """`x` as a tensor: a PartialSum's sum, any tensor itself."""
    return x.sum() if isinstance(x, PartialSum) else x


def fused_or_summed(x, residual, weight, norm_bias, eps: float, rms: bool):
    """What a norm's `add_norm(x, residual)` starts with: ((normed, summed), x) when `x` is a
    PartialSum that its group's one-shot path sums into this norm in one kernel (summed = the
    sum + residual; normed = its LayerNorm, RMSNorm when `rms`); else (None, `summed(x)`), for
    the norm to add and normalise itself."""
    if isinstance(x, PartialSum) and x._sum is None:
        fast = fast_all_reduce(x.group)
        if fast is not None:
            pushed = x.pushed
            fused = fast.add_norm(x.partial, x.bias, residual, weight, norm_bias, eps, rms, pushed)
            if fused is not None:
                x.take_push()
                return fused, x
    return None, summed(x)
