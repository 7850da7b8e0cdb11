"""Logit bias and the repetition, frequency and presence penalties of a step's rows as one Triton
kernel (energon/penalties.py decides when it runs and owns the tables it reads).

One program per row of the step's logits copies the row to float32 scores; a row with a sequence
(a slot) then gets its rules, in the order of Penalties' eager ops:

1. each logit_bias id gets its value added (a sequence's bias ids are distinct);
2. with a repetition penalty r != 1, every id in the prompt or the output gets
   where(x < 0, x * r, x / r) of its value after step 1, once however often it occurs: all the
   values are read (into `Scratch`) before any is written back;
3. with a frequency penalty f != 0, each occurrence in the output subtracts f (atomic adds of
   the same value, so the order of the adds does not change the result);
4. with a presence penalty p != 0, each id in the output loses p once (read all, then write).

A barrier separates the phases, and a phase's reads from its writes where ids may repeat: the
threads of a program see each other's global writes after it. Division is IEEE round-to-nearest
(`div_rn`), as torch's, so the results equal the eager ops' bit for bit.

`Index` holds, for each of the batch's rows, its slot in the tables (-1: no rules) and its output,
prompt and bias lengths (4 x batch int64, in that order): the host knows the lengths, so one copy
brings everything a step needs, and the tables' pads are never read. The scores have room past
the vocabulary for a row's reads (its prompt and output). Works in Triton's interpreter too (the
tests run it on CPU tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256  # ids a phase handles at once
COPY_BLOCK = 2048  # logits a program copies at once


@triton.jit
def _ids(Output, Prompt, slot, stride_o, stride_p, j, prompt_len, total):
    """The ids at positions j of a row's prompt followed by its output (total of them)."""
    in_prompt = j < prompt_len
    from_prompt = tl.load(Prompt + slot * stride_p + j, mask=in_prompt, other=0)
    from_output = tl.load(
        Output + slot * stride_o + (j - prompt_len), mask=(j >= prompt_len) & (j < total), other=0
    )
    return tl.where(in_prompt, from_prompt, from_output)


@triton.jit
def _penalties_kernel(
    Src,
    X,
    Index,
    Output,
    Prompt,
    BiasIds,
    BiasValues,
    Rules,
    batch,
    vocab,
    stride_src,
    stride_x,
    stride_o,
    stride_p,
    stride_b,
    stride_v,
    stride_r,
    BIAS: tl.constexpr,
    REPETITION: tl.constexpr,
    FREQUENCY: tl.constexpr,
    PRESENCE: tl.constexpr,
    BLOCK: tl.constexpr,
    COPY_BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    x = X + b * stride_x
    src = Src + b * stride_src
    columns = tl.arange(0, COPY_BLOCK)
    for start in range(0, vocab, COPY_BLOCK):
        c = start + columns
        tl.store(x + c, tl.load(src + c, mask=c < vocab).to(tl.float32), mask=c < vocab)
    slot = tl.load(Index + b)
    if slot >= 0:
        output_len = tl.load(Index + batch + b)
        prompt_len = tl.load(Index + 2 * batch + b)
        bias_len = tl.load(Index + 3 * batch + b)
        scratch = x + vocab
        lanes = tl.arange(0, BLOCK)
        tl.debug_barrier()
        _rules(x, scratch, lanes, slot, output_len, prompt_len, bias_len, Output, Prompt,
               BiasIds, BiasValues, Rules, vocab, stride_o, stride_p, stride_b, stride_v,
               stride_r, BIAS, REPETITION, FREQUENCY, PRESENCE, BLOCK)  # fmt: skip


@triton.jit
def _rules(
    x,
    scratch,
    lanes,
    slot,
    output_len,
    prompt_len,
    bias_len,
    Output,
    Prompt,
    BiasIds,
    BiasValues,
    Rules,
    vocab,
    stride_o,
    stride_p,
    stride_b,
    stride_v,
    stride_r,
    BIAS: tl.constexpr,
    REPETITION: tl.constexpr,
    FREQUENCY: tl.constexpr,
    PRESENCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row's phases (the module docstring), after its copy. A function of its own, not the
    kernel's body: written inline under `if slot >= 0` (49718fb, and again as a plain inline of
    this body) the compiled kernel gave wrong scores on an H200 while Triton's interpreter gave
    the right ones; not taken apart (the inline version reuses the copy loop's variable names
    inside the branch)."""
    if BIAS:
        for start in range(0, bias_len, BLOCK):
            j = start + lanes
            m = j < bias_len
            ids = tl.load(BiasIds + slot * stride_b + j, mask=m, other=0)
            m = m & (ids < vocab)
            values = tl.load(BiasValues + slot * stride_v + j, mask=m, other=0.0)
            tl.store(x + ids, tl.load(x + ids, mask=m, other=0.0) + values, mask=m)
        tl.debug_barrier()

    if REPETITION:
        r = tl.load(Rules + slot * stride_r)
        if r != 1.0:
            seen = prompt_len + output_len
            for start in range(0, seen, BLOCK):
                j = start + lanes
                ids = _ids(Output, Prompt, slot, stride_o, stride_p, j, prompt_len, seen)
                m = (j < seen) & (ids < vocab)
                logit = tl.load(x + ids, mask=m, other=0.0)
                penalised = tl.where(logit < 0, logit * r, tl.math.div_rn(logit, r))
                tl.store(scratch + j, penalised, mask=m)
            tl.debug_barrier()
            for start in range(0, seen, BLOCK):
                j = start + lanes
                ids = _ids(Output, Prompt, slot, stride_o, stride_p, j, prompt_len, seen)
                m = (j < seen) & (ids < vocab)
                tl.store(x + ids, tl.load(scratch + j, mask=m, other=0.0), mask=m)
            tl.debug_barrier()

    if FREQUENCY:
        f = tl.load(Rules + slot * stride_r + 1)
        if f != 0.0:
            for start in range(0, output_len, BLOCK):
                j = start + lanes
                m = j < output_len
                ids = tl.load(Output + slot * stride_o + j, mask=m, other=0)
                m = m & (ids < vocab)
                tl.atomic_add(x + ids, tl.zeros([BLOCK], tl.float32) - f, mask=m)
            tl.debug_barrier()

    if PRESENCE:
        p = tl.load(Rules + slot * stride_r + 2)
        if p != 0.0:
            for start in range(0, output_len, BLOCK):
                j = start + lanes
                m = j < output_len
                ids = tl.load(Output + slot * stride_o + j, mask=m, other=0)
                m = m & (ids < vocab)
                tl.store(scratch + j, tl.load(x + ids, mask=m, other=0.0) - p, mask=m)
            tl.debug_barrier()
            for start in range(0, output_len, BLOCK):
                j = start + lanes
                m = j < output_len
                ids = tl.load(Output + slot * stride_o + j, mask=m, other=0)
                m = m & (ids < vocab)
                tl.store(x + ids, tl.load(scratch + j, mask=m, other=0.0), mask=m)


def penalise(
    logits: torch.Tensor,
    index: torch.Tensor,
    output: torch.Tensor,
    prompt: torch.Tensor,
    bias_ids: torch.Tensor,
    bias_values: torch.Tensor,
    rules: torch.Tensor,
    bias: bool,
    repetition: bool,
    frequency: bool,
    presence: bool,
    block: int = BLOCK,
) -> torch.Tensor:
    """A float32 copy of `logits` [batch, vocab] with each row's rules applied (the module
    docstring; `index` [4 x batch] as it says), returned as a view [batch, vocab] of wider rows.
    The tables are Penalties': int64 id tables [slots, width] (output, prompt, bias_ids),
    float32 bias_values [slots, width] and rules [slots, 3] (repetition, frequency, presence).
    The flags leave out rules no row has."""
    batch, vocab = logits.shape
    if index.numel() != 4 * batch:
        raise ValueError(f"index holds {index.numel()} values for {batch} rows: need 4 a row")
    if logits.stride(-1) != 1:
        raise ValueError("penalise needs logits with contiguous rows")
    # room for the widest phase that reads before it writes: a row's prompt and output
    scratch = (prompt.shape[1] if repetition else 0) + output.shape[1]
    x = torch.empty((batch, vocab + scratch), dtype=torch.float32, device=logits.device)
    if batch == 0:
        return x[:, :vocab]
    _penalties_kernel[(batch,)](
        logits,
        x,
        index,
        output,
        prompt,
        bias_ids,
        bias_values,
        rules,
        batch,
        vocab,
        logits.stride(0),
        x.stride(0),
        output.stride(0),
        prompt.stride(0),
        bias_ids.stride(0),
        bias_values.stride(0),
        rules.stride(0),
        BIAS=bias,
        REPETITION=repetition,
        FREQUENCY=frequency,
        PRESENCE=presence,
        BLOCK=block,
        COPY_BLOCK=COPY_BLOCK,
        num_warps=4,
    )
    return x[:, :vocab]
