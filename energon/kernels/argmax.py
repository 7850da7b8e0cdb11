"""Greedy tokens: `argmax(logits)`, the first index of each row's largest logit.

On CUDA (fp16/bf16/fp32 logits with dense rows, triton installed, ENERGON_TRITON_ARGMAX not
"0") one Triton kernel (argmax_kernels.py), which a decode graph captures after the LM head so
that a greedy step's tokens come out of the graph; elsewhere `torch.argmax`. Both give the same
index (the first of the largest; a NaN counts as the largest).
"""

from __future__ import annotations

import torch

from energon.kernels import triton_kernels_for

ENV_SWITCH = "ENERGON_TRITON_ARGMAX"  # "0": torch.argmax everywhere


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: each row's argmax of 2-D `logits` [rows, vocab]."""
    kernels = None
    if logits.dim() == 2 and logits.stride(-1) == 1:
        kernels = triton_kernels_for("argmax_kernels", ENV_SWITCH, logits)
    if kernels is None:
        return logits.argmax(dim=-1)
    return kernels.argmax_rows(logits)
