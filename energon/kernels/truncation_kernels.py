"""Temperature, top-k, top-p and min-p of the rows a step draws from, as one Triton kernel and
without a sort (energon/sampler.py decides when it runs).

The eager ops sort each row of the vocabulary (a 64 x 50,272 sort is ~0.3 ms on an H200, 256
rows ~1 ms). Here one program per row finds its thresholds by a radix search over the row
instead: a float's bits, with the sign's order fixed (`_key`), order keys as the floats are
ordered, so the k-th largest logit is the largest key t with count(key >= t) >= k, and the top-p
boundary is the largest key t with mass(key >= t) >= p; either is found 4 bits at a time, a pass
over the row (in L2) per 4 bits, each pass testing the 16 next digits at once. Per row:

1. x / temperature in place (IEEE division, as torch's) and the row's largest value m;
2. top_k in (0, vocab): the k-th largest value; the tokens below it are out (ties with it stay);
3. top_p < 1: over the tokens left, each with weight exp(x - m), the largest t with
   mass(key >= t) >= p x their total mass; the tokens below t are out. This keeps the smallest
   most-likely-first set whose probability reaches p, as the sorted cumulative sum does, except
   that a tie group at the boundary stays whole (a sort keeps it in index order up to p) and the
   sums are taken in another order (float32 rounding at the boundary);
4. min_p > 0: tokens with exp(x - m) < min_p (their probability below min_p times the largest)
   are out;

and the tokens out are set to -inf. A row's top_k, top_p and min_p come as the eager ops take
them (top_k as a float, vocab when off; top_p inf when off; min_p 0 when off). Works in Triton's
interpreter too (the tests run it on CPU tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 512  # logits a pass handles at once
DIGITS = 16  # candidates a radix pass tests: 4 bits


@triton.jit
def _key(x):
    """int64 in [0, 2**32) ordered as the float32 values x are (-0.0 just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered.to(tl.int64) + 2147483648


@triton.jit
def _radix_pass(row, vocab, prefix, shift, floor, m, target, BY_MASS: tl.constexpr,
                BLOCK: tl.constexpr, DIGITS: tl.constexpr):  # fmt: skip
    """The next 4-bit digit d of the threshold: how many of the candidates prefix + c << shift
    (c = 1..15) keep count (or mass, exp(x - m)) of the keys >= them, among keys >= floor, at
    least `target`."""
    digits = tl.arange(0, DIGITS).to(tl.int64)
    candidates = prefix + (digits << shift)  # [DIGITS]
    total = tl.zeros([DIGITS], tl.float32)
    for start in range(0, vocab, BLOCK):
        c = start + tl.arange(0, BLOCK)
        x = tl.load(row + c, mask=c < vocab, other=float("-inf"))
        key = _key(x)
        inside = (c < vocab) & (key >= floor)
        if BY_MASS:
            weight = tl.where(inside, tl.exp(x - m), 0.0)
        else:
            weight = tl.where(inside, 1.0, 0.0)
        above = key[:, None] >= candidates[None, :]  # [BLOCK, DIGITS]
        total += tl.sum(tl.where(above, weight[:, None], 0.0), axis=0)
    return tl.sum(((total >= target) & (digits > 0)).to(tl.int64), axis=0)


@triton.jit
def _threshold(row, vocab, floor, m, target, BY_MASS: tl.constexpr, BLOCK: tl.constexpr,
               DIGITS: tl.constexpr):  # fmt: skip
    """The largest key t with count (or mass) of keys >= t, among keys >= floor, >= target."""
    prefix = tl.zeros([], tl.int64)
    for i in tl.static_range(8):
        shift = 28 - 4 * i
        digit = _radix_pass(row, vocab, prefix, shift, floor, m, target, BY_MASS, BLOCK, DIGITS)
        prefix = prefix + (digit << shift)
    return prefix


@triton.jit
def _truncation_kernel(
    X,
    Table,
    rows,
    vocab,
    stride_x,
    TOP_K: tl.constexpr,
    TOP_P: tl.constexpr,
    MIN_P: tl.constexpr,
    BLOCK: tl.constexpr,
    DIGITS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    row = X + r * stride_x
    temperature = tl.load(Table + r)
    lanes = tl.arange(0, BLOCK)

    m = tl.full([], float("-inf"), tl.float32)
    for start in range(0, vocab, BLOCK):
        c = start + lanes
        y = tl.math.div_rn(tl.load(row + c, mask=c < vocab, other=0.0), temperature)
        tl.store(row + c, y, mask=c < vocab)
        m = tl.maximum(m, tl.max(tl.where(c < vocab, y, float("-inf")), axis=0))
    tl.debug_barrier()

    floor = tl.zeros([], tl.int64)  # keys below it are out
    if TOP_K:
        k = tl.load(Table + rows + r)
        if k < vocab:
            floor = _threshold(row, vocab, floor, m, k, False, BLOCK, DIGITS)
    if TOP_P:
        p = tl.load(Table + 2 * rows + r)
        if p < 1.0:
            total = tl.zeros([], tl.float32)
            for start in range(0, vocab, BLOCK):
                c = start + lanes
                x = tl.load(row + c, mask=c < vocab, other=float("-inf"))
                inside = (c < vocab) & (_key(x) >= floor)
                total += tl.sum(tl.where(inside, tl.exp(x - m), 0.0), axis=0)
            floor = _threshold(row, vocab, floor, m, p * total, True, BLOCK, DIGITS)
    min_p = tl.zeros([], tl.float32)
    if MIN_P:
        min_p = tl.load(Table + 3 * rows + r)
    if (floor > 0) | (min_p > 0.0):
        for start in range(0, vocab, BLOCK):
            c = start + lanes
            x = tl.load(row + c, mask=c < vocab, other=0.0)
            out = (_key(x) < floor) | (tl.exp(x - m) < min_p)
            tl.store(row + c, float("-inf"), mask=(c < vocab) & out)


def truncate(x: torch.Tensor, table: torch.Tensor, top_k: bool, top_p: bool, min_p: bool) -> None:
    """In place on the float32 logits x [rows, vocab] (contiguous rows): divide by each row's
    temperature, then apply its top_k, top_p and min_p (the module docstring). `table` float32
    [4, rows]: temperature, top_k (vocab: off), top_p (inf: off), min_p (0: off). The flags leave
    out what no row has."""
    rows, vocab = x.shape
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        raise ValueError("truncate needs float32 logits with contiguous rows")
    if tuple(table.shape) != (4, rows) or not table.is_contiguous():
        raise ValueError(f"table must be a contiguous [4, {rows}] tensor, not {tuple(table.shape)}")
    if rows == 0:
        return
    _truncation_kernel[(rows,)](
        x,
        table,
        rows,
        vocab,
        x.stride(0),
        TOP_K=top_k,
        TOP_P=top_p,
        MIN_P=min_p,
        BLOCK=BLOCK,
        DIGITS=DIGITS,
        num_warps=8,
    )
