"""Linear layers at decode batch sizes: `linear(x, weight, bias, relu)`.

A decode step multiplies a handful of rows by every weight matrix: the GEMM streams the weights
and its speed is the fraction of HBM bandwidth it holds. On an H200 (opt-13b / llama-2-13b
shapes, one row, CUDA graphs) cuBLAS held 3.5-3.8 TB/s on fc1 and fc2 and, for the square and
K-heavy shapes it splits over K, paid a second reduction kernel; the Triton kernel of
`gemv_kernels` (no split-K, bias and ReLU in its epilogue) held 3.8-4.0 TB/s, 4-5 us less per
fc1 / fc2 call (docs/benchmarks.md, "Decode GEMV").

So on CUDA, for fp16/bf16 inputs of at most `MAX_ROWS` rows (dense rows, weight
[N, K] with dense rows), with triton installed and ENERGON_TRITON_GEMV not "0", the Triton kernel
runs; everything else (prefill, large batches, CPU, fp32) goes to cuBLAS as before, ReLU after a
bias fused into cuBLASLt's epilogue. The two round differently in the last bit (fp32
accumulation in another order), like any two GEMM kernels.

On Hopper and later the Triton GEMV launches as a programmatic dependent launch (it prefetches
its first weight tiles while the kernel before it ends; gemv_kernels.py, chain.py), except right
after another GEMV: a GEMV whose input the previous Triton GEMV wrote (OPT's fc2 after fc1, the
ReLU in fc1's epilogue) launches plainly. A GEMV releases its dependents as soon as it starts, so
a dependent GEMV's programs sat on the SMs and prefetched through the whole of the one before;
on one H200 that made opt-13b's batch-1 decode 7.62 against 7.29 ms a token with every
dependent launch off, while llama-2-13b, whose MLP has a kernel between its GEMVs, gained from
them (7.26 against 7.41; docs/benchmarks.md, "Engine generation"). ENERGON_PDL=0 launches every
GEMV plainly. The results are the same bits either way.

The linears of a tensor-parallel layer (tp > 1: `early_weights`) take one or two rows on the
Gluon kernel of `gemv_tma` instead (Hopper or later, dependent launches on, ENERGON_GEMV_TMA not
"0"): its programs copy their first weight tiles by TMA before they wait, so the weight stream
runs through the all-reduce + norm before it. What that buys at tp=2 and why tp=1 keeps the
Triton kernel: gemv_tma.py's docstring.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch
import torch.nn.functional as F

from energon.kernels import dependent_launch, triton_kernels_for, triton_module

log = logging.getLogger(__name__)

ENV_SWITCH = "ENERGON_TRITON_GEMV"  # "0": every linear on cuBLAS
TMA_SWITCH = "ENERGON_GEMV_TMA"  # "0": one or two rows on gemv_kernels too
MAX_ROWS = 16  # rows of x the Triton kernel takes (one tensor-core tile)
TMA_ROWS = 2  # rows of x the Gluon kernel (gemv_tma.py) takes


def kernels_for(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The Triton GEMV module when it takes this call, else None (cuBLAS). The row count is
    looked at first: a prefill's linears (hundreds of rows) leave at once."""
    if x.dim() != 2 or x.shape[0] > MAX_ROWS or x.dtype == torch.float32:
        return None
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        return None
    return triton_kernels_for("gemv_kernels", ENV_SWITCH, x, weight, bias)


def tma_kernels_for(x: torch.Tensor, weight: torch.Tensor):
    """The Gluon GEMV module (gemv_tma.py) when it takes a call `kernels_for` took: Hopper or
    later with dependent launches on, one or two rows, TMA-aligned rows; else None."""
    if x.shape[0] > TMA_ROWS or not dependent_launch(x.device):
        return None
    if os.environ.get(TMA_SWITCH, "1") == "0":
        return None
    module = triton_module("gemv_tma")
    return module if module is not None and module.takes(x, weight) else None


class EarlyWeights:
    """Calls issued to the Gluon kernel (gemv_tma.py) in this process; a call captured into a
    CUDA graph counts once, at capture (the workers' `info` reports it). If the kernel fails
    before any call of it succeeded (a triton whose Gluon it does not compile with), `error`
    keeps why and every later call takes the Triton GEMV."""

    calls = 0
    error: str | None = None

    @classmethod
    def run(cls, tma, x, weight, bias, relu, push=None) -> torch.Tensor | None:
        """tma.gemv(...), or None after the first call's failure (logged once)."""
        if cls.error is not None:
            return None
        try:
            y = tma.gemv(x, weight, bias, relu, pdl=True, push=push)
        except Exception as exc:
            if cls.calls:
                raise  # it ran before: not a matter of the toolchain
            cls.error = f"{type(exc).__name__}: {exc}"
            log.warning("the early-weights GEMV (gemv_tma.py) failed, Triton GEMV instead: %s",
                        cls.error)  # fmt: skip
            return None
        cls.calls += 1
        return y


class _LastOutput:
    """The output of the latest Triton GEMV, while it lives (a weak reference: a freed output's
    memory may hold another tensor next)."""

    ref: weakref.ref | None = None

    @classmethod
    def wrote(cls, x: torch.Tensor) -> bool:
        """Whether `x` starts inside the latest GEMV's output."""
        y = cls.ref() if cls.ref is not None else None
        return y is not None and 0 <= x.data_ptr() - y.data_ptr() < y.nbytes

    @classmethod
    def remember(cls, y: torch.Tensor) -> torch.Tensor:
        cls.ref = weakref.ref(y)
        return y


def pushed_linear(x: torch.Tensor, weight: torch.Tensor, push) -> torch.Tensor | None:
    """x @ weight.T by the early-weights GEMV (gemv_tma.py), which also pushes the product into
    every rank's slots of the fused all-reduce + norm (`push`, a one_shot_norm.Push;
    energon/parallel/partial_sum.py); None when that kernel does not take the call (nothing
    pushed: the caller runs `linear`)."""
    return _early_weights(x, weight, None, False, push) if kernels_for(x, weight, None) else None


def _early_weights(x, weight, bias, relu, push=None) -> torch.Tensor | None:
    """The call on the early-weights GEMV (gemv_tma.py) when it takes it, else None."""
    if (tma := tma_kernels_for(x, weight)) is None:
        return None
    y = EarlyWeights.run(tma, x, weight, bias, relu, push)
    return None if y is None else _LastOutput.remember(y)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    early_weights: bool = False,
) -> torch.Tensor:
    """x @ weight.T (+ bias) (then ReLU), by the fastest kernel for its shape. `early_weights`:
    stream the weights while the kernel before still runs (gemv_tma.py), for the linears of a
    tensor-parallel layer, whose GEMVs follow all-reduces."""
    kernels = kernels_for(x, weight, bias)
    if kernels and early_weights and (y := _early_weights(x, weight, bias, relu)) is not None:
        return y
    if kernels:
        pdl = dependent_launch(x.device) and not _LastOutput.wrote(x)
        return _LastOutput.remember(kernels.gemv(x, weight, bias, relu, pdl=pdl))
    if relu and bias is not None and x.is_cuda and x.dim() == 2 and x.dtype != torch.float32:
        return torch._addmm_activation(bias, x, weight.t())  # ReLU in cuBLASLt's epilogue
    y = F.linear(x, weight, bias)
    return F.relu(y) if relu else y
