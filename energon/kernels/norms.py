"""The models' norms, each with the residual add before it fused in: `add_norm(x, residual)`.

`LayerNorm` is `nn.LayerNorm` and `RMSNorm` is LLaMA's, with the same parameters (checkpoint names
and random init are unchanged) and one more method, `add_norm(x, residual) -> (normed, summed)`:
summed = x + residual, normed = the norm of summed. A pre-LN layer's residual add and the norm
after it become one call: `normed, hidden = self.final_layer_norm.add_norm(attn_out, hidden)`.
`x` may be a row-parallel layer's `PartialSum` (energon/parallel/partial_sum.py): its all-reduce
then joins the add and the norm in one kernel where that kernel takes it, else it is summed first.

On CUDA tensors (fp16, bf16 or fp32, rows up to 16384 wide, no autograd) each call is one
Triton kernel (energon/kernels/norm_kernels.py). Elsewhere, without triton, or with
ENERGON_TRITON_NORMS=0 in the environment, the eager torch ops run exactly as the models wrote them
before, so CPU results are bit for bit unchanged. Either way the sum rounds to the input dtype as
`x + residual` does; the Triton normed rows may differ from eager's in the last bit (another
reduction order).
"""

from __future__ import annotations

import torch
from torch import nn

from energon.kernels import triton_kernels_for
from energon.parallel.partial_sum import fused_or_summed

ENV_SWITCH = "ENERGON_TRITON_NORMS"  # "0" keeps every norm on the eager torch ops


def kernels_for(x: torch.Tensor, *others: torch.Tensor | None):
    """The Triton kernels module when it takes this call, else None (run the eager ops).

    It takes x on CUDA in fp16/bf16/fp32 with rows of at most norm_kernels.MAX_WIDTH, `others`
    (weight, bias, residual; None skipped) of x's dtype and device, nothing that needs autograd,
    when triton imports and ENERGON_TRITON_NORMS is not "0".
    """
    kernels = triton_kernels_for("norm_kernels", ENV_SWITCH, x, *others)
    return kernels if kernels is not None and x.shape[-1] <= kernels.MAX_WIDTH else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in eager torch, Hugging Face's LlamaRMSNorm order: float32 statistics, the
    normalised row cast back to x's dtype, then scaled by weight. Returns weight * normed."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters, same eager results) plus `add_norm`; one Triton kernel per
    call on CUDA."""

    def _kernels_for(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.shape[-1:] != self.normalized_shape or (
            residual is not None and residual.shape != x.shape
        ):
            return None  # eager: a norm over several dims, or shapes eager rejects or broadcasts
        return kernels_for(x, self.weight, self.bias, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer norm of x over its last dim, shaped and typed like x."""
        if kernels := self._kernels_for(x):
            return kernels.norm_rows(x, self.weight, self.bias, self.eps, rms=False)[0]
        return super().forward(x)

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer_norm(x + residual), x + residual), the sum rounded as eager `x + residual`;
        (layer_norm(x), x) when residual is None."""
        fused, x = fused_or_summed(x, residual, self.weight, self.bias, self.eps, rms=False)
        if fused is not None:
            return fused
        if residual is None:
            return self(x), x
        if kernels := self._kernels_for(x, residual):
            return kernels.norm_rows(x, self.weight, self.bias, self.eps, False, residual)
        summed = x + residual
        return super().forward(summed), summed


class RMSNorm(nn.Module):
    """LLaMA / Mistral / Qwen2 RMSNorm (see `rms_norm`) plus `add_norm`; one Triton kernel per
    call on CUDA."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def _kernels_for(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.shape[-1:] != self.weight.shape or (
            residual is not None and residual.shape != x.shape
        ):
            return None  # eager: shapes it rejects or broadcasts
        return kernels_for(x, self.weight, residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The RMS norm of x over its last dim, shaped and typed like x (weight's dtype if wider)."""
        if kernels := self._kernels_for(x):
            return kernels.norm_rows(x, self.weight, None, self.eps, rms=True)[0]
        return rms_norm(x, self.weight, self.eps)

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual), the sum rounded as eager `x + residual`;
        (rms_norm(x), x) when residual is None."""
        fused, x = fused_or_summed(x, residual, self.weight, None, self.eps, rms=True)
        if fused is not None:
            return fused
        if residual is None:
            return self(x), x
        if kernels := self._kernels_for(x, residual):
            return kernels.norm_rows(x, self.weight, None, self.eps, True, residual)
        summed = x + residual
        return rms_norm(summed, self.weight, self.eps), summed
