"""Run a function on every rank of a small gloo group of spawned processes (tests only)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from energon.kernels.norms import rms_norm
from energon.parallel.allreduce import OneShotAllReduce
from energon.parallel.ranks import run_ranks
from energon.parallel.topology import Topology


def run_in_gloo_group(fn, tp: int = 1, pp: int = 1, *args, timeout: float = 60.0) -> list:
    """fn(state, *args) on each of tp*pp ranks; returns the results in rank order.

    Raises RuntimeError with the remote traceback when a rank fails or does not answer."""
    return run_ranks(fn, Topology(tp, pp), "cpu", args, timeout)


class GlooKernels(OneShotAllReduce):
    """OneShotAllReduce with gloo in place of the two CUDA kernels; logs which one ran."""

    def __init__(
        self, group, max_bytes: int, float16_in_float32: bool = True, own=False, norm=False
    ):
        buf, scratch = (torch.zeros(2 * max_bytes, dtype=torch.uint8) for _ in range(2))
        cpu = torch.device("cpu")
        peers = ("gloo stands in for the peers",) if own or norm else None
        super().__init__(
            group,
            cpu,
            max_bytes,
            buf,
            scratch,
            None,
            float16_in_float32,
            peers,
            0 if norm else None,
        )
        self.kernels: list[tuple[str, torch.dtype, int]] = []
        self.rank = dist.get_rank(group)
        self.pushed: list[torch.Tensor] = []  # rows `pushing_linear` pushed, not yet summed

    def _copy_and_sum(self, symm, x):
        symm.copy_(x)
        dist.all_reduce(symm, group=self.group)
        x.copy_(symm)
        self.kernels.append(("copy_and_sum", symm.dtype, symm.numel()))

    def _sum(self, symm, out):
        out.copy_(symm)
        dist.all_reduce(out, group=self.group)
        self.kernels.append(("sum", symm.dtype, symm.numel()))

    def _own_sum(self, x, out, bias):
        """Energon's kernel's arithmetic: float32 sum over ranks (+ bias), rounded once."""
        total = x.float()
        dist.all_reduce(total, group=self.group)
        if bias is not None:
            total += bias.float()
        out.copy_(total)
        self.kernels.append(("own", x.dtype, x.numel(), bias is not None, x.is_contiguous()))

    def _push_target(self):
        return ("gloo stands in for the slots", self.rank)

    def pushing_linear(self, x, weight, push):
        """What gemv.pushed_linear does on a GPU: x @ weight.T, the product kept as the slots
        hold it (`pushed`) until the fused kernel takes it."""
        assert push == self._push_target()
        y = F.linear(x, weight)
        self.pushed.append(y.clone())
        return y

    def _own_add_norm(
        self, x, bias, residual, weight, norm_bias, eps, rms, pushed=False, normalised=True
    ):
        """The fused kernel's arithmetic: the float32 sum (+ bias) rounded once, the residual
        added in float32 and rounded once, then the eager norm (unless not `normalised`). `pushed`: this rank's rows come
        from what `pushing_linear` pushed, not from `x` (the oldest push first)."""
        if pushed:
            x = self.pushed.pop(0)
        total = x.float()
        dist.all_reduce(total, group=self.group)
        if bias is not None:
            total += bias.float()
        summed = total.to(x.dtype)
        if residual is not None:
            summed = (summed.float() + residual.float()).to(x.dtype)
        if not normalised:
            normed = None
        elif rms:
            normed = rms_norm(summed, weight, eps)
        else:
            normed = F.layer_norm(summed, summed.shape[-1:], weight, norm_bias, eps)
        self.kernels.append(("add_norm", x.dtype, x.numel(), bias is not None, rms, pushed))
        return normed, summed
