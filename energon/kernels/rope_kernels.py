"""Rotary embedding and SwiGLU's gate as one Triton kernel each (LLaMA-style models' decode step).

`rotate_` turns q and k in place, each token's each head in one program that computes its own
cos/sin from the token's position (no per-step tables, nothing cached between calls: a CUDA graph
replays it as is). `silu_mul` is silu(gate) * up for the merged gate/up GEMM's output.

Arithmetic is the eager ops', rounding where they round: positions become float32 and times the
float32 inverse frequencies; cos and sin (the CUDA math library's, through libdevice, as torch's
kernels call them) round to the activations' dtype; `q * cos + rotate_half(q) * sin` rounds each
product and the sum to that dtype, as the three eager kernels do; silu rounds before the multiply.

`energon.kernels.rope` decides when these run; call them directly only for tests. Works with
triton 3.6+ and in the interpreter (TRITON_INTERPRET=1, as for norm_kernels).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from energon.kernels.chain import chained, wait_then_release

SILU_BLOCK = 1024  # columns of one row per silu_mul program
# The interpreter has no libdevice: there its numpy cos, sin and exp stand in.
LIBDEVICE = os.environ.get("TRITON_INTERPRET", "0") != "1"
# No multiply-add contraction: an eager product rounds before the sum (fp32 included).
EXACT = {"enable_fp_fusion": False}


@triton.jit
def _rounded(x, dtype: tl.constexpr):
    """x (float32) rounded to `dtype` and back: what storing an eager op's result does."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rotary_kernel(
    Q,
    K,
    Positions,
    InvFreq,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    q_heads,
    HALF: tl.constexpr,  # head_dim // 2
    BLOCK: tl.constexpr,  # HALF's next power of two
    LIBDEVICE: tl.constexpr,
    PDL: tl.constexpr,  # a programmatic dependent launch (chain.py)
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    if h < q_heads:
        row = Q + t * stride_qt + h * stride_qh
    else:
        row = K + t * stride_kt + (h - q_heads) * stride_kh
    dtype: tl.constexpr = Q.dtype.element_ty
    freq = tl.load(Positions + t).to(tl.float32) * tl.load(InvFreq + i, mask=mask, other=0.0)
    if LIBDEVICE:
        cos, sin = libdevice.cos(freq), libdevice.sin(freq)
    else:
        cos, sin = tl.cos(freq), tl.sin(freq)
    cos, sin = _rounded(cos, dtype), _rounded(sin, dtype)
    wait_then_release(PDL)  # the positions are the step's; q and k come from the kernel before
    x1 = tl.load(row + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + HALF + i, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = [-x2, x1]
    out1 = _rounded(x1 * cos, dtype) + _rounded(-x2 * sin, dtype)
    out2 = _rounded(x2 * cos, dtype) + _rounded(x1 * sin, dtype)
    tl.store(row + i, out1.to(dtype), mask=mask)
    tl.store(row + HALF + i, out2.to(dtype), mask=mask)


def rotate_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place (rows may be strided views, each head's D
    values dense) by `positions` [T] with `inv_freq` [D/2] float32; returns (q, k)."""
    T, heads, dim = q.shape
    half = dim // 2
    if k.shape[0] != T or k.shape[2] != dim or q.dtype != k.dtype or dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not pair for rotary")
    if q.stride(2) != 1 or k.stride(2) != 1:
        raise ValueError("rotary needs each head's values dense")
    if T == 0:
        return q, k
    _rotary_kernel[(T, heads + k.shape[1])](
        q,
        k,
        positions,
        inv_freq,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        heads,
        HALF=half,
        BLOCK=triton.next_power_of_2(half),
        LIBDEVICE=LIBDEVICE,
        **chained(q.device),
        **EXACT,
    )
    return q, k


@triton.jit
def _silu_mul_kernel(
    Gate,
    Up,
    Out,
    stride_g,
    stride_u,
    stride_o,
    width,
    BLOCK: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    PDL: tl.constexpr,  # a programmatic dependent launch (chain.py)
):
    wait_then_release(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    dtype: tl.constexpr = Gate.dtype.element_ty
    g = tl.load(Gate + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(Up + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    if LIBDEVICE:
        e = libdevice.exp(-g)
    else:
        e = tl.exp(-g)
    act = _rounded(tl.math.div_rn(g, 1.0 + e), dtype)  # IEEE division, as torch's
    tl.store(Out + row * stride_o + cols, (act * u).to(dtype), mask=mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [T, I] rows (strided rows allowed, columns dense): a new [T, I]."""
    if gate.shape != up.shape or gate.dim() != 2 or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} differ")
    if gate.stride(1) != 1 or up.stride(1) != 1:
        raise ValueError("silu_mul needs dense columns")
    rows, width = gate.shape
    out = torch.empty_like(gate, memory_format=torch.contiguous_format)
    if rows and width:
        grid = (rows, triton.cdiv(width, SILU_BLOCK))
        _silu_mul_kernel[grid](
            gate,
            up,
            out,
            gate.stride(0),
            up.stride(0),
            out.stride(0),
            width,
            BLOCK=SILU_BLOCK,
            LIBDEVICE=LIBDEVICE,
            **chained(gate.device),
            **EXACT,
        )
    return out
