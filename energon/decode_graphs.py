"""CUDA graphs of one stage's decode step, one per batch-size bucket.

At batch 1 a decode step of a 13B model is ~40 layers x ~30 kernel launches, and Python plus the
launches take longer than the GPU needs to read the weights. `DecodeGraphs` captures the stage's
body (embedding / layers / head, not the stage-to-stage send and receive) once per bucket of batch
sizes and replays it: one launch per step.

A graph reads its inputs from static buffers, so a step of B sequences is written into the
buffers of the smallest bucket >= B and the rows past B are padding: position 0, one visible key,
and their K/V written to a scratch block that no sequence owns (the runner allocates the KV cache
one block larger for it). Pad rows never mix with real ones (attention is per sequence, every
other op per row), and their outputs are dropped.

A graph is captured for a fixed block-table width (the model's context window) and launches the
attention kernel for that longest context: shorter sequences end their loops early. Steps that do
not fit (a prefill, more sequences than the largest bucket, a wider block table) run eagerly, or
a prefill graph replays them (prefill_graphs.py).
`capture=False` runs the same static-buffer path eagerly: the cpu tests check the padding with it.

With `groups` the graphs also take a step's groups of sequences that share cached prefix blocks
(energon/parallel/shared_prefix.py) in static buffers of that many groups: attention reads each
group's prefix once. The runner keeps such a set beside the plain one (which launches no pass
over prefixes) and replays it for steps that have groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from energon.graph_capture import StagingRing, StepGraphs
from energon.parallel.packing import BatchMeta
from energon.parallel.shared_prefix import SharedPrefixes

STAGING = 8  # pinned staging sets in the ring (energon/graph_capture.py)
DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)

Body = Callable[[torch.Tensor, BatchMeta], torch.Tensor]


class DecodeGraphs(StepGraphs):
    """Replays `body(x, meta)` for decode steps (one new token per sequence).

    `x` is the stage's input: int64 token ids [B] on the first stage, activations [B, hidden] of
    `dtype` elsewhere. `stage`: the stage and cache keywords of `StepGraphs` (first_stage,
    hidden_size, dtype, device, block_size, scratch_block); `max_blocks` is the block-table
    width graphs are captured for. With `groups` (> 0) every step brings its groups of
    sequences sharing prefix blocks, at most that many, whose pass over a prefix takes
    `prefix_parts` parts (fixed when captured).
    """

    def __init__(
        self,
        body: Body,
        *,
        max_blocks: int,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        capture: bool = True,
        groups: int = 0,
        prefix_parts: int = 1,
        **stage,
    ):
        super().__init__(body, buckets=buckets, unit="batch sizes", **stage)
        block_size, scratch_block, device = self.block_size, self.scratch_block, self.device
        self.max_blocks = max_blocks
        self.max_batch = n = self.buckets[-1]
        # Every row starts as a pad (what the capture runs on: it writes only the scratch block).
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.tables = torch.full((n, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        # pinned staging of positions / slots [2, n], context lens and block tables (a ring:
        # energon/graph_capture.py says why), each in its buffer's dtype: a copy that converts
        # goes through a pageable temporary and waits for the queued kernels (a GPU test
        # below)
        self._staging = StagingRing(
            [((2, n), torch.int64), ((n,), torch.int32), ((n, max_blocks), torch.int32)],
            device,
            STAGING,
        )
        # a pad row: position 0, its K/V in the scratch block's first slot (and one visible key)
        self._pads = torch.tensor([[0], [scratch_block * block_size]]).expand(2, n)
        self.groups = groups
        if groups:  # no group until a step brings some: the pass's programs have nothing to do
            int32 = torch.int32
            self.shared = SharedPrefixes(
                prefix_lens=torch.zeros(n, dtype=int32, device=device),
                group_seqs=torch.zeros(groups, n, dtype=int32, device=device),
                group_sizes=torch.zeros(groups, dtype=int32, device=device),
                group_lens=torch.zeros(groups, dtype=int32, device=device),
                max_prefix_len=max_blocks * block_size,
                saved_tokens=0,
                parts=prefix_parts,
            )
            shapes = [((n,), int32), ((groups, n), int32), ((2, groups), int32)]
            self._group_staging = StagingRing(shapes, device, STAGING)
        if capture:
            self._capture()

    # ----------------------------------------------------------------------------- stepping

    def takes(
        self, query_lens: list[int], width: int, shared: SharedPrefixes | None = None
    ) -> bool:
        """Whether a step with these query lengths and block-table width (and, for graphs with
        groups, these groups) can be replayed."""
        return (
            0 < len(query_lens) <= self.max_batch
            and width <= self.max_blocks
            and all(q == 1 for q in query_lens)
            and (shared is not None) == bool(self.groups)
            and (shared is None or shared.num_groups <= self.groups)
        )

    def run(
        self,
        x: torch.Tensor | None,
        context_lens: list[int],
        block_tables: torch.Tensor,
        receive: Callable[[torch.Tensor], None] | None = None,
        shared: SharedPrefixes | None = None,
    ) -> torch.Tensor:
        """The body's output rows [B, ...] for one decode step of B = len(context_lens) sequences.

        `x`: the token ids [B] (first stage) or None with `receive(buffer)` filling the
        activations [B, hidden] in place (a later stage's receive). `block_tables`: int [B, width]
        padded with -1, as the step message carries it. The result is a view of a static buffer,
        valid until the next call. `shared`: the step's groups (host tensors), for graphs with
        groups.
        """
        B = len(context_lens)
        bucket = self._bucket(B)
        self._stage_inputs(x, context_lens, block_tables, bucket)
        if self.groups:
            self._stage_groups(shared, B, bucket)
        return self._replay(bucket, B, receive)[:B]

    def _stage_groups(self, shared: SharedPrefixes, B: int, bucket: int) -> None:
        """The step's groups into the static group buffers (the rows past them empty)."""
        (lens, seqs, counts), done = self._group_staging.next()
        G, M = shared.group_seqs.shape
        lens[:B] = shared.prefix_lens
        lens[B:bucket] = 0
        seqs[:G, :M] = shared.group_seqs
        counts.zero_()
        counts[0, :G] = shared.group_sizes
        counts[1, :G] = shared.group_lens
        nb, static = self._group_staging.pinned, self.shared
        static.prefix_lens[:bucket].copy_(lens[:bucket], non_blocking=nb)
        static.group_seqs[:G, :M].copy_(seqs[:G, :M], non_blocking=nb)
        static.group_sizes.copy_(counts[0], non_blocking=nb)
        static.group_lens.copy_(counts[1], non_blocking=nb)
        done()

    def _stage_inputs(self, x, context_lens, block_tables, bucket: int) -> None:
        """Writes the step (and its pad rows) into the static buffers, through pinned staging.
        Positions, slots and the checks come from `BatchMeta.for_step`, built on the host."""
        B, width = len(context_lens), block_tables.shape[1]
        step = BatchMeta.for_step([1] * B, context_lens, block_tables, self.block_size)
        (host, lens, tables), done = self._staging.next()
        host[0, :B] = step.positions
        host[1, :B] = step.slot_mapping
        host[:, B:bucket] = self._pads[:, : bucket - B]
        lens[:B] = step.context_lens
        lens[B:bucket] = 1
        tables[:B, :width] = step.block_tables
        tables[B:bucket, 0] = self.scratch_block
        nb = self._staging.pinned
        self.positions[:bucket].copy_(host[0, :bucket], non_blocking=nb)
        self.slots[:bucket].copy_(host[1, :bucket], non_blocking=nb)
        self.context_lens[:bucket].copy_(lens[:bucket], non_blocking=nb)
        self.tables[:bucket, :width].copy_(tables[:bucket, :width], non_blocking=nb)
        if x is not None:
            self.x[:B].copy_(x, non_blocking=nb)
        done()

    def _meta(self, bucket: int) -> BatchMeta:
        """The BatchMeta of a bucket: views of the static buffers, one new token per sequence."""
        return BatchMeta(
            cu_seqlens=self.cu_seqlens[: bucket + 1],
            positions=self.positions[:bucket],
            context_lens=self.context_lens[:bucket],
            max_seqlen_q=1,
            max_context_len=self.max_blocks * self.block_size,
            block_tables=self.tables[:bucket],
            slot_mapping=self.slots[:bucket],
            logits_indices=None,  # one token per sequence: every row is a last token
            shared=(
                replace(self.shared, prefix_lens=self.shared.prefix_lens[:bucket])
                if self.groups
                else None
            ),
        )
