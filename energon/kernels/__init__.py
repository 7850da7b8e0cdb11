"""Triton kernels for the per-layer ops of a decode step, each behind a module that falls
back to the eager torch ops off CUDA or without triton.

norms.py         LayerNorm / RMSNorm modules with `add_norm` (residual add fused into the norm)
norm_kernels.py  their Triton kernel (imported only on CUDA, only when triton is installed)
rope.py          rotary embedding (in place) and SwiGLU's silu(gate) * up for LLaMA-style models
rope_kernels.py  their Triton kernels (imported only on CUDA, only when triton is installed)
gemv.py          `linear` for decode-sized inputs (a few rows): the Triton GEMV, else cuBLAS
gemv_kernels.py  its Triton kernel (no split-K; bias and ReLU in the epilogue)
gemv_tma.py      the Gluon GEMV of tensor-parallel layers on Hopper: weights copied by TMA
                 before it waits for the kernel before it; a row-parallel one pushes its
                 product into the fused all-reduce + norm's slots
one_shot.py      the float16 one-shot all-reduce over NVLink peer memory, bias fused
                 (energon.parallel.allreduce decides when it runs)
one_shot_norm.py the same all-reduce with the residual add and the norm after it, one program
                 per row (a row-parallel layer's PartialSum handed to a norm's add_norm)
penalty_kernels.py logit_bias and the repetition, frequency and presence penalties of a step's
                 rows with the logits' float32 copy, one kernel (energon/penalties.py decides)
argmax.py        greedy tokens: each row's argmax, first index of the largest (`torch.argmax`)
argmax_kernels.py its Triton kernel, pieces of a row and the last program combining them
tickets.py       the zeroed counters of such "last program combines" kernels (attention too)
chain.py         `wait_then_release`, how each of these kernels enters a programmatic
                 dependent launch, and `chained(device)`, its launch keywords
                 (`dependent_launch` below says when they launch so)
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take
PDL_SWITCH = "ENERGON_PDL"  # "0": no programmatic dependent launches (chain.py)


@functools.cache
def triton_module(name: str):
    """energon.kernels.`name` (a module of Triton kernels), imported on first CUDA use; None
    where triton is not installed."""
    try:
        return importlib.import_module(f"energon.kernels.{name}")
    except ImportError:
        return None


def triton_kernels_for(name: str, switch: str, x: torch.Tensor, *others: torch.Tensor | None):
    """Module energon.kernels.`name` when its Triton kernels take this call, else None (run the
    eager ops): x on CUDA in fp16/bf16/fp32, `others` (None skipped) of x's dtype and device,
    nothing that needs autograd, triton installed and the environment variable `switch` not "0"."""
    if not x.is_cuda or x.dtype not in DTYPES or x.dim() == 0:
        return None
    present = [t for t in others if t is not None]
    if any(t.dtype != x.dtype or t.device != x.device for t in present):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, *present)):
        return None
    if os.environ.get(switch, "1") == "0":
        return None
    return triton_module(name)


def dependent_launch(device: torch.device) -> bool:
    """Whether the Triton kernels launch as programmatic dependent launches on `device`
    (chain.py): a Hopper or later GPU, and ENERGON_PDL not "0"."""
    return (
        device.type == "cuda"
        and os.environ.get(PDL_SWITCH, "1") != "0"
        and _sm90_or_later(device.index)
    )


@functools.cache
def _sm90_or_later(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device`, which the kernels size their grids by; off CUDA an
    H100's 132 (the interpreter's runs)."""
    return _sm_count(device.index or 0) if device.type == "cuda" else 132


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
