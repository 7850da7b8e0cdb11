"""LayerNorm and RMSNorm as one Triton kernel, optionally fused with the residual add before them.

One program normalises one row, held whole in registers (`BLOCK` = the width's next power of two,
up to `MAX_WIDTH`), so a decode step's few rows cost one short kernel each instead of an add kernel
and a norm kernel. Arithmetic follows the eager ops it replaces: the residual sum is computed in
float32 and rounded once to the input dtype (what `x + residual` does on CUDA), statistics are
float32, and RMSNorm casts the normalised row back to the input dtype before scaling by the weight
(Hugging Face's LlamaRMSNorm).

`energon.kernels.norms` decides when these run; call them directly only for tests. Works with
triton 3.6+ and in the interpreter (TRITON_INTERPRET=1 set before triton is imported: the tests
run the kernel on CPU tensors that way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from energon.kernels.chain import chained, wait_then_release

MAX_WIDTH = 16384  # a whole row in 16 warps' registers without spilling (ptxas, sm_90)


@triton.jit
def _norm_kernel(
    X,
    Residual,
    Summed,
    Out,
    Weight,
    Bias,
    stride_x,
    stride_r,
    stride_s,
    stride_o,
    width,
    eps,
    RMS: tl.constexpr,  # RMSNorm (HF order of casts), else LayerNorm
    ADD: tl.constexpr,  # normalise X + Residual and store that sum in Summed
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # a programmatic dependent launch (chain.py)
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    # the weights before the wait (no kernel writes them): after it, x's and the residual's
    # loads are the only ones on the way to the store
    weight, bias = affine(Weight, Bias, cols, mask, HAS_WEIGHT, HAS_BIAS)
    wait_then_release(PDL)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(Summed + row * stride_s + cols, x, mask=mask)
    y = normalise(x, mask, width, eps, weight, bias, RMS, HAS_WEIGHT, HAS_BIAS)
    tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def vector(Ptr, cols, mask, PRESENT: tl.constexpr):
    """A weight or bias row as float32 when PRESENT (else an unread placeholder: the kernels
    apply it only under the same flag). No kernel writes these: a chained kernel loads them
    before its wait."""
    row = tl.zeros(cols.shape, tl.float32)
    if PRESENT:
        row = tl.load(Ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return row


@triton.jit
def affine(Weight, Bias, cols, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """(weight, bias) of a norm as float32 rows for `normalise`."""
    return vector(Weight, cols, mask, HAS_WEIGHT), vector(Bias, cols, mask, HAS_BIAS)


@triton.jit
def normalise(
    x,  # one row in its dtype, 0 past `width`
    mask,
    width,
    eps,
    weight,  # float32 rows from `affine`
    bias,
    RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """The normalised row in float32 (weight and bias applied), before its cast to the output
    dtype; `x` holds it in the input dtype. Also the epilogue of the fused all-reduce
    (energon/kernels/one_shot_norm.py), so that both round alike."""
    dtype = x.dtype
    x = x.to(tl.float32)
    if RMS:
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
        y = (x * rstd).to(dtype).to(tl.float32)
    else:
        mean = tl.sum(x, axis=0) / width
        centred = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / width + eps)
        y = centred * rstd
    if HAS_WEIGHT:
        y = y * weight
    if HAS_BIAS:
        y = y + bias
    return y


def num_warps_for(block: int) -> int:
    """Warps per row: about 256 elements per warp (8 a thread), between 1 and 16."""
    return min(16, max(1, block // 256))


def rows_of(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` as [rows, width] with unit stride along the row (a copy only when it has to be)."""
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def norm_rows(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise each row (last dim) of `x`, or of `x + residual` when residual is given.

    Returns (normed, summed), both shaped and typed like x; summed is x itself without a residual.
    weight/bias are [width] or None (bias is ignored for RMSNorm). Tensors must share x's device
    and dtype and the width must be at most MAX_WIDTH; raises ValueError otherwise.
    """
    width = x.shape[-1]
    if width > MAX_WIDTH or (residual is not None and residual.shape != x.shape):
        raise ValueError(
            f"norm_rows takes rows of at most {MAX_WIDTH} and a residual shaped like x "
            f"(got x {tuple(x.shape)}, residual {None if residual is None else tuple(residual.shape)})"
        )
    for t in (weight, bias, residual):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(
                f"norm_rows needs one dtype and device (x: {x.dtype} on {x.device}, "
                f"got {t.dtype} on {t.device})"
            )
    src = rows_of(x, width)
    out = torch.empty(src.shape, dtype=x.dtype, device=x.device)
    add = residual is not None
    res = rows_of(residual, width) if add else src  # src: an unused stand-in
    summed = torch.empty_like(out) if add else src
    if src.shape[0]:
        block = triton.next_power_of_2(width)
        _norm_kernel[(src.shape[0],)](
            src,
            res,
            summed,
            out,
            weight.contiguous() if weight is not None else src,
            bias.contiguous() if bias is not None and not rms else src,
            src.stride(0),
            res.stride(0) if add else 0,
            summed.stride(0) if add else 0,
            out.stride(0),
            width,
            eps,
            RMS=rms,
            ADD=add,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None and not rms,
            BLOCK=block,
            num_warps=num_warps_for(block),
            **chained(x.device),
        )
    return out.view(x.shape), (summed.view(x.shape) if add else x)
