"""CUDA graphs of one stage's prefill of new prompts, one per bucket of token counts.

An eager prefill issues some 25 torch ops and Triton launches per layer from Python: for a
40-layer 13B model 19-32 ms of host time on the H200 machines (worker thread, measured), about
what one H200 needs for a 512-token prompt and twice what each of two needs at tp=2 (~15 ms), so
the first token at tp > 1 came no sooner than at tp=1. A request that arrives at an idle engine
is prefilled alone, and a few that arrive together share a step: the cases these graphs serve,
so that the first token costs what the GPUs need for it.

A step of at most MAX_SEQS sequences of T new tokens in all, at most the largest bucket, each
with a context of at most `max_blocks` blocks (its new tokens at its end: a whole prompt, or
the rest of one after a cached prefix), replays the graph of the smallest bucket >= T. The graph
always holds MAX_SEQS + 1 sequences: the step's, empty ones up to MAX_SEQS, then the rows past T
as a sequence of pads (it may be empty too) at position 0 whose K/V go to the scratch block that
the decode graphs' pads use (its block table is that block throughout). The new K/V are written
first and every sequence then reads its keys through its block table (flash varlen where torch
reads a paged cache, else the Triton kernel of `energon.parallel.paged_prefill`), so one graph
serves new prompts and prompts after a cached prefix alike: a request whose system prompt is
cached would otherwise prefill its own few tokens eagerly, which costs the host longer than the
whole uncached prompt costs a graph. Attention is per sequence and every other op per row, so
pads never mix with the prompts, and the head computes MAX_SEQS rows: each prompt's last, then
pad rows. A decode beside the prompts rides along; a step of decodes only is the decode graphs'.
Anything else (more sequences or tokens, longer contexts) runs eagerly.
Long prompts gain nothing anyway: from ~1,000 tokens at tp=2 the device takes longer than the
host. `capture=False` runs the same static-buffer path eagerly (the cpu tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from energon.graph_capture import StagingRing, StepGraphs
from energon.parallel.packing import BatchMeta

STAGING = 4  # pinned staging sets in the ring (energon/graph_capture.py)
MAX_SEQS = 8  # prompts one graphed step takes
# At most a third of the work on pads above 128 tokens; 14 graphs of the whole stage.
DEFAULT_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)

Body = Callable[[torch.Tensor, BatchMeta], torch.Tensor]


class PrefillGraphs(StepGraphs):
    """Replays `body(x, meta)` for steps of new prompts (the stage's body, as DecodeGraphs).

    `x` is the stage's input: int64 token ids [T] on the first stage, activations [T, hidden]
    of `dtype` elsewhere. `stage`: the stage and cache keywords of `StepGraphs` (first_stage,
    hidden_size, dtype, device, block_size, scratch_block); `last_stage`: the body ends in the
    head, which computes the prompts' last rows only; `max_blocks`: the block-table width the
    graphs are captured for (the longest context they read).
    """

    def __init__(
        self,
        body: Body,
        *,
        last_stage: bool,
        max_blocks: int,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        capture: bool = True,
        **stage,
    ):
        super().__init__(body, buckets=buckets, unit="token counts", **stage)
        block_size, scratch_block, device = self.block_size, self.scratch_block, self.device
        self.last_stage = last_stage
        self.max_tokens = n = self.buckets[-1]
        self.max_context = max_blocks * block_size
        if n > self.max_context:  # the capture runs a prompt of n tokens: its table must hold it
            raise ValueError(
                f"the largest bucket ({n} tokens) passes the {self.max_context} tokens that "
                f"{max_blocks} blocks of {block_size} hold"
            )
        # pad rows' K/V slots: the scratch block's, in turn
        self._pad_slots = scratch_block * block_size + torch.arange(n) % block_size
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.zeros(n, dtype=torch.int64, device=device)
        # cu_seqlens [MAX_SEQS + 2], then context lens [MAX_SEQS + 1] (`_lengths` says what)
        self.lengths = torch.zeros(2 * MAX_SEQS + 3, dtype=torch.int32, device=device)
        self.last_rows = torch.zeros(MAX_SEQS, dtype=torch.int64, device=device)
        table_shape = (MAX_SEQS + 1, max_blocks)  # the pads' and empty sequences': scratch
        self.tables = torch.full(table_shape, scratch_block, dtype=torch.int32, device=device)
        self._staging = StagingRing(
            [
                ((2, n), torch.int64),
                ((2 * MAX_SEQS + 3,), torch.int32),
                ((MAX_SEQS,), torch.int64),
                (table_shape, torch.int32),
            ],
            device,
            STAGING,
        )
        self._fill(n)
        if capture:
            self._capture(prepare=self._fill)

    def takes(self, query_lens, context_lens) -> bool:
        """Whether a graph holds a step of these lengths: prompts (whole, or after a cached
        prefix), maybe beside decodes, but not decodes only (the decode graphs' steps, which
        ask first: more than MAX_SEQS sequences answers at once)."""
        return (
            0 < len(query_lens) <= MAX_SEQS
            and len(context_lens) == len(query_lens)
            and sum(query_lens) <= self.max_tokens
            and all(
                0 < q <= c <= self.max_context
                for q, c in zip(query_lens, context_lens, strict=True)
            )
            and any(q > 1 or q == c for q, c in zip(query_lens, context_lens, strict=True))
        )

    def run(
        self,
        query_lens: list[int],
        context_lens: list[int],
        block_tables,
        x: torch.Tensor | None = None,
        receive: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The body's output for a step of prompts of `query_lens` new tokens (T in all) at the
        end of `context_lens` tokens: each prompt's last row's logits [S, V] on the last stage,
        else the activations [T, hidden] (a view of a static buffer, valid until the next call).

        `x`: the token ids [T] (first stage), or None with `receive(buffer)` filling the
        activations [T, hidden] in place (a later stage). `block_tables`: the prompts' tables
        as the step message carries them (lists, or an int tensor [S, width] padded with -1).
        """
        total = sum(query_lens)
        bucket = self._bucket(total)
        self._stage_inputs(x, query_lens, context_lens, block_tables, bucket)
        out = self._replay(bucket, total, receive)
        return out[: len(query_lens)] if self.last_stage else out[:total]

    def _stage_inputs(
        self, x, query_lens: list[int], context_lens: list[int], block_tables, bucket: int
    ) -> None:
        """Writes the prompts' positions, slots, lengths and block tables (and the pads') into
        the static buffers through pinned staging; positions and slots come from
        `BatchMeta.for_step`, which also checks the tables against the lengths."""
        total, S = sum(query_lens), len(query_lens)
        step = BatchMeta.for_step(query_lens, context_lens, block_tables, self.block_size, "last")
        (host, lengths, last_rows, tables), done = self._staging.next()
        host[0, :total] = step.positions
        host[0, total:bucket] = 0
        host[1, :total] = step.slot_mapping
        host[1, total:bucket] = self._pad_slots[: bucket - total]
        lengths.copy_(_lengths(query_lens, context_lens, bucket))
        last_rows.fill_(bucket - 1)
        last_rows[:S] = step.logits_indices  # each prompt's last row
        tables.fill_(self.scratch_block)  # the pads' row, and the empty sequences'
        width = -(-max(context_lens) // self.block_size)  # past a context: block 0, never read
        tables[:S, :width] = step.block_tables[:, :width]
        nb = self._staging.pinned
        self.positions[:bucket].copy_(host[0, :bucket], non_blocking=nb)
        self.slots[:bucket].copy_(host[1, :bucket], non_blocking=nb)
        self.lengths.copy_(lengths, non_blocking=nb)
        self.last_rows.copy_(last_rows, non_blocking=nb)
        self.tables.copy_(tables, non_blocking=nb)
        if x is not None:
            self.x[:total].copy_(x, non_blocking=nb)
        done()

    def _fill(self, bucket: int) -> None:
        """The static inputs of one prompt that fills `bucket` (what the capture runs on): its
        K/V go to the scratch block."""
        self.positions[:bucket].copy_(torch.arange(bucket))
        self.slots[:bucket].copy_(self._pad_slots[:bucket])
        self.lengths.copy_(_lengths([bucket], [bucket], bucket))
        self.last_rows.fill_(bucket - 1)
        self.tables.fill_(self.scratch_block)

    def _meta(self, bucket: int) -> BatchMeta:
        """The BatchMeta of a bucket: views of the static buffers, MAX_SEQS + 1 sequences that
        read their keys through their block tables."""
        return BatchMeta(
            cu_seqlens=self.lengths[: MAX_SEQS + 2],
            positions=self.positions[:bucket],
            context_lens=self.lengths[MAX_SEQS + 2 :],
            max_seqlen_q=bucket,
            max_context_len=self.max_context,
            block_tables=self.tables,
            slot_mapping=self.slots[:bucket],
            logits_indices=self.last_rows if self.last_stage else None,
        )


def _lengths(query_lens: list[int], context_lens: list[int], bucket: int) -> torch.Tensor:
    """cu_seqlens then context lens of a graph's MAX_SEQS + 1 sequences: the prompts, empty
    ones up to MAX_SEQS, then the pads up to `bucket` (int32 [2 * MAX_SEQS + 3])."""
    pads = bucket - sum(query_lens)
    empty = [0] * (MAX_SEQS - len(query_lens))
    cu = [0]
    for size in [*query_lens, *empty, pads]:
        cu.append(cu[-1] + size)
    return torch.tensor(cu + [*context_lens, *empty, pads], dtype=torch.int32)
