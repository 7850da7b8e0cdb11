"""LLaMA-style models' per-layer elementwise work as one kernel each on CUDA: rotary embedding of
q and k (`rotary_kernels_for`, then `rotate_`) and SwiGLU's silu(gate) * up (`silu_mul`).

Eagerly, rotary is a dozen small kernels per layer (positions times frequencies, cat, cos, sin,
casts, rotate_half's chunk, neg and cat, three multiplies and adds) and SwiGLU two; in a batch-1
decode step of llama-2-13b on an H200 they took 1.4 ms of 9.3. The Triton kernels
(energon/kernels/rope_kernels.py) do the same arithmetic with the same roundings. They run on
CUDA tensors (fp16, bf16, fp32, no autograd) when triton imports and ENERGON_TRITON_ROPE is not
"0"; elsewhere the eager torch ops run, so CPU results are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from energon.kernels import triton_kernels_for

ENV_SWITCH = "ENERGON_TRITON_ROPE"  # "0" keeps rotary and SwiGLU on the eager torch ops


def rotary_kernels_for(x: torch.Tensor, *others: torch.Tensor):
    """The Triton kernels module when it takes these activations, else None (run eager ops)."""
    return triton_kernels_for("rope_kernels", ENV_SWITCH, x, *others)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up: one kernel on CUDA, `F.silu(gate) * up` elsewhere."""
    kernels = rotary_kernels_for(gate, up)
    if kernels is not None and gate.dim() == 2 and gate.shape == up.shape:
        return kernels.silu_mul(gate, up)
    return F.silu(gate) * up
