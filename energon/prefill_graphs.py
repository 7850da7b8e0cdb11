"""CUDA graphs of one stage's prefill of a single new prompt, one per bucket of prompt lengths.

An eager prefill issues some 25 torch ops and Triton launches per layer from Python: for a
40-layer 13B model 19-32 ms of host time on the H200 machines (worker thread, measured), about
what one H200 needs for a 512-token prompt and twice what each of two needs at tp=2 (~15 ms), so
the first token at tp > 1 came no sooner than at tp=1. A request that arrives at an idle engine
is prefilled alone, which is the case these graphs serve: the first token then costs what the
GPUs need for it.

A step of exactly one sequence whose tokens are all new (no cached prefix) and at most the
largest bucket replays the graph of the smallest bucket >= its length L. Its rows past L form a
second sequence of pads (cu_seqlens [0, L, bucket]; it may be empty) at position 0 whose K/V go
to the scratch block that the decode graphs' pads use: attention is per sequence and every
other op per row, so pads never mix with the prompt, and the head computes only row L - 1.
Anything else (several sequences, a cached prefix, a longer prompt) runs eagerly. Long prompts
gain nothing anyway: from ~1,000 tokens at tp=2 the device takes longer than the host.
`capture=False` runs the same static-buffer path eagerly (the cpu tests).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from energon.graph_capture import StagingRing, capture_buckets
from energon.parallel.packing import BatchMeta

STAGING = 4  # pinned staging sets in the ring (energon/graph_capture.py)
# At most a third of the work on pads above 128 tokens; 14 graphs of the whole stage.
DEFAULT_BUCKETS = (16, 32, 64, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)

Body = Callable[[torch.Tensor, BatchMeta], torch.Tensor]


class PrefillGraphs:
    """Replays `body(x, meta)` for single-prompt prefills (the stage's body, as DecodeGraphs).

    `x` is the stage's input: int64 token ids [L] on the first stage, activations [L, hidden]
    of `dtype` elsewhere. `block_size` / `scratch_block` describe the KV cache; `last_stage`:
    the body ends in the head, which computes the prompt's last row only.
    """

    def __init__(
        self,
        body: Body,
        *,
        first_stage: bool,
        last_stage: bool,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        scratch_block: int,
        buckets: tuple[int, ...] = DEFAULT_BUCKETS,
        capture: bool = True,
    ):
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive token counts (got {buckets})")
        self.body = body
        self.device = device
        self.last_stage = last_stage
        self.block_size = block_size
        self.buckets = tuple(sorted(set(buckets)))
        self.max_tokens = n = self.buckets[-1]
        if first_stage:
            self.x = torch.zeros(n, dtype=torch.int64, device=device)
        else:
            self.x = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        # pad rows' K/V slots: the scratch block's, in turn
        self._pad_slots = scratch_block * block_size + torch.arange(n) % block_size
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slots = torch.zeros(n, dtype=torch.int64, device=device)
        # cu_seqlens [0, L, bucket], then the context lens [L, bucket - L]; the head's row L - 1
        self.lengths = torch.zeros(5, dtype=torch.int32, device=device)
        self.last_row = torch.zeros(1, dtype=torch.int64, device=device)
        self._staging = StagingRing(
            [((2, n), torch.int64), ((5,), torch.int32), ((1,), torch.int64)], device, STAGING
        )
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.captured = capture
        self.steps = 0  # prefills that took this path
        self._fill(n)
        if capture:
            self.graphs, self.outputs = capture_buckets(
                self.buckets,
                lambda b: self.body(self.x[:b], self._meta(b)),
                device,
                prepare=self._fill,
            )

    def takes(self, query_lens: list[int], context_lens: list[int]) -> bool:
        """Whether a step of these lengths is one new prompt that a graph holds."""
        return (
            len(query_lens) == 1
            and len(context_lens) == 1
            and 0 < query_lens[0] == context_lens[0] <= self.max_tokens
        )

    def run(
        self,
        length: int,
        block_tables,
        x: torch.Tensor | None = None,
        receive: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """The body's output for one prompt of `length` tokens: the last row's logits [1, V]
        on the last stage, else the activations [length, hidden] (a view of a static buffer,
        valid until the next call).

        `x`: the token ids [length] (first stage), or None with `receive(buffer)` filling the
        activations [length, hidden] in place (a later stage). `block_tables`: the sequence's
        table as the step message carries it (a list, or an int tensor [1, width] padded with
        -1).
        """
        bucket = next(b for b in self.buckets if b >= length)
        self._stage_inputs(x, length, block_tables, bucket)
        self.steps += 1
        if receive is not None:
            receive(self.x[:length])
        if self.captured:
            self.graphs[bucket].replay()
            out = self.outputs[bucket]
        else:
            out = self.body(self.x[:bucket], self._meta(bucket))
        return out if self.last_stage else out[:length]

    def _stage_inputs(self, x, length: int, block_tables, bucket: int) -> None:
        """Writes the prompt's positions, slots and lengths (and the pads') into the static
        buffers through pinned staging; the slots come from `BatchMeta.for_step`, which also
        checks the table against the length."""
        step = BatchMeta.for_step([length], [length], block_tables, self.block_size)
        (host, lengths, last_row), done = self._staging.next()
        host[0, :length] = step.positions
        host[0, length:bucket] = 0
        host[1, :length] = step.slot_mapping
        host[1, length:bucket] = self._pad_slots[: bucket - length]
        lengths.copy_(torch.tensor([0, length, bucket, length, bucket - length]))
        last_row[0] = length - 1
        nb = self._staging.pinned
        self.positions[:bucket].copy_(host[0, :bucket], non_blocking=nb)
        self.slots[:bucket].copy_(host[1, :bucket], non_blocking=nb)
        self.lengths.copy_(lengths, non_blocking=nb)
        self.last_row.copy_(last_row, non_blocking=nb)
        if x is not None:
            self.x[:length].copy_(x, non_blocking=nb)
        done()

    def _fill(self, bucket: int) -> None:
        """The static inputs of a prompt that fills `bucket` (what the capture runs on): its
        K/V go to the scratch block."""
        self.positions[:bucket].copy_(torch.arange(bucket))
        self.slots[:bucket].copy_(self._pad_slots[:bucket])
        self.lengths.copy_(torch.tensor([0, bucket, bucket, bucket, 0]))
        self.last_row.fill_(bucket - 1)

    def _meta(self, bucket: int) -> BatchMeta:
        """The BatchMeta of a bucket: views of the static buffers, the prompt and its pads as
        two fresh sequences."""
        return BatchMeta(
            cu_seqlens=self.lengths[:3],
            positions=self.positions[:bucket],
            context_lens=self.lengths[3:5],
            max_seqlen_q=bucket,
            max_context_len=bucket,
            slot_mapping=self.slots[:bucket],
            logits_indices=self.last_row if self.last_stage else None,
            fresh=True,
        )
