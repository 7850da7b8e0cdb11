"""Padding-free batches: sequences of different lengths as one packed token dimension.

A step's new tokens are concatenated into `[T]` ids / `[T, hidden]` activations; `BatchMeta` says
where each sequence starts (`cu_seqlens`), each token's position, and what attention may see.
Only attention looks at sequence boundaries. `pad`/`BatchMeta.for_padded` build the padded
baseline (every sequence stretched to the longest) that the benchmark compares against.

Every builder works from host lists and moves small index tensors to the device once; nothing
here reads a device tensor back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from energon.parallel.shared_prefix import SharedPrefixes


@dataclass
class BatchMeta:
    cu_seqlens: torch.Tensor  # int32 [B+1]: offsets of each sequence's new tokens in the packed dim
    positions: torch.Tensor  # int64 [T]: absolute position of each packed token in its sequence
    context_lens: (
        torch.Tensor
    )  # int32 [B]: tokens visible to attention after this step (cached+new)
    max_seqlen_q: int
    max_context_len: int
    block_tables: torch.Tensor | None = None  # int32 [B, max_blocks]: KV-cache blocks per sequence
    slot_mapping: torch.Tensor | None = None  # int64 [T]: flat cache slot per new token
    logits_indices: torch.Tensor | None = None  # int64 [N]: rows the LM head computes; None = all
    padded_shape: tuple[int, int] | None = None  # (B, L) on the padded baseline path, else None
    fresh: bool = False  # no sequence has cached tokens: its keys are exactly the step's new ones
    # A cached step that mixes kinds of sequences (decodes, later prompt chunks, fresh prompts,
    # in runs as the scheduler orders them): per run (first token, its BatchMeta, whether it
    # reads the cache), so that attention runs each its own way (decodes through the paged
    # kernel, fresh prompts straight on their new tokens). None: one kind.
    parts: tuple[tuple[int, BatchMeta, bool], ...] | None = None
    # A decode step's groups of sequences that share cached prefix blocks, on the device: the
    # paged decode kernel reads each group's prefix once (energon/parallel/shared_prefix.py).
    shared: SharedPrefixes | None = None

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @classmethod
    def for_prefill(cls, lengths: list[int], device: torch.device | str = "cpu") -> BatchMeta:
        """No cache, every token new, positions 0..len-1. Raises ValueError on an empty sequence."""
        return cls.for_step(lengths, lengths, device=device)

    @classmethod
    def for_step(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]] | torch.Tensor | None = None,
        block_size: int | None = None,
        logits_indices: str | list[int] | None = None,
        device: torch.device | str = "cpu",
    ) -> BatchMeta:
        """Meta for `query_lens[b]` new tokens of sequence b, which then has `context_lens[b]`.

        With `block_tables` (lists, or an int tensor [B, width] padded with -1, as the step
        message carries them) and `block_size` new tokens get cache slots. `logits_indices` is
        "last" (last new token of each sequence), "all"/None (every row) or explicit rows.
        Raises ValueError on inconsistent lengths.
        """
        if len(query_lens) != len(context_lens) or not query_lens:
            raise ValueError(
                f"need one context_len per query_len (got {len(query_lens)} and {len(context_lens)})"
            )
        for q, c in zip(query_lens, context_lens, strict=True):
            if q < 1 or c < q:
                raise ValueError(f"need 1 <= query_len <= context_len (got {q}, {c})")
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        c_lens = torch.tensor(context_lens, dtype=torch.int64)
        cu = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
        torch.cumsum(q_lens, 0, out=cu[1:])
        total = int(cu[-1])
        seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
        positions = torch.arange(total) - cu[:-1][seq_of_token] + (c_lens - q_lens)[seq_of_token]

        tables = slots = None
        if block_tables is not None:
            if block_size is None:
                raise ValueError("block_size is required with block_tables")
            tables = _padded_tables(block_tables, c_lens, block_size)
            blocks = tables[seq_of_token, positions // block_size]
            slots = blocks * block_size + positions % block_size

        if logits_indices == "last":
            rows = cu[1:] - 1
        elif logits_indices in (None, "all"):
            rows = None
        else:
            rows = torch.tensor(list(logits_indices), dtype=torch.int64)

        def dev(t, dtype):
            return None if t is None else t.to(dtype).to(device, non_blocking=True)

        fresh = [q == c for q, c in zip(query_lens, context_lens, strict=True)]
        kinds = [0 if f else 1 if q == 1 else 2 for f, q in zip(fresh, query_lens, strict=True)]
        parts = None
        if tables is not None and len(set(kinds)) > 1:
            starts = [b for b in range(len(kinds)) if b == 0 or kinds[b] != kinds[b - 1]]
            parts = tuple(
                (
                    int(cu[a]),
                    cls.for_step(
                        query_lens[a:b],
                        context_lens[a:b],
                        tables[a:b],  # fresh prompts read them back where flash cannot run
                        block_size,
                        None,
                        device,
                    ),
                    kinds[a] != 0,
                )
                for a, b in zip(starts, [*starts[1:], len(kinds)], strict=True)
            )

        return cls(
            cu_seqlens=dev(cu, torch.int32),
            positions=dev(positions, torch.int64),
            context_lens=dev(c_lens, torch.int32),
            max_seqlen_q=max(query_lens),
            max_context_len=max(context_lens),
            block_tables=dev(tables, torch.int32),
            slot_mapping=dev(slots, torch.int64),
            logits_indices=dev(rows, torch.int64),
            fresh=all(fresh),
            parts=parts,
        )

    @classmethod
    def for_padded(cls, batch: int, length: int, device: torch.device | str = "cpu") -> BatchMeta:
        """The padded baseline: `batch` sequences of `length` tokens each, pads included."""
        meta = cls.for_prefill([length] * batch, device)
        meta.padded_shape = (batch, length)
        return meta


def pack(
    seqs: list[list[int]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, BatchMeta]:
    """Concatenate token lists: returns (input_ids int64 [T], BatchMeta.for_prefill)."""
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64)
    return ids.to(device, non_blocking=True), BatchMeta.for_prefill([len(s) for s in seqs], device)


def unpack(x: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """Split packed rows back into one tensor per sequence."""
    return list(torch.split(x, lengths))


def pad(
    seqs: list[list[int]], pad_id: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, BatchMeta, torch.Tensor]:
    """The padded baseline: returns (input_ids int64 [B*L], meta, real_rows int64 [T]).

    Each sequence is right-padded to the longest; `real_rows` picks the non-pad rows, in packed
    order, out of the [B*L] outputs.
    """
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], dtype=torch.int64)
    real = torch.tensor([b * width + i for b, s in enumerate(seqs) for i in range(len(s))])
    meta = BatchMeta.for_padded(len(seqs), width, device)
    return ids.flatten().to(device), meta, real.to(device)


def _padded_tables(
    block_tables: list[list[int]] | torch.Tensor, context_lens: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Block tables as an int64 [B, width] tensor, padding set to block 0 (never read: keys past a
    sequence's context_len are masked). Raises ValueError when a table cannot hold its context."""
    need = -(-context_lens // block_size)  # blocks each sequence's context fills
    if isinstance(block_tables, torch.Tensor):
        tables = block_tables.to(torch.int64)
        have = (tables >= 0).sum(1) if tables.shape[1] else torch.zeros_like(need)
    else:
        have = torch.tensor([len(t) for t in block_tables], dtype=torch.int64)
        width = int(have.max())
        tables = torch.tensor([list(t) + [0] * (width - len(t)) for t in block_tables])
    short = (have < need).nonzero()
    if len(short):
        b = int(short[0])
        raise ValueError(
            f"block table of {int(have[b])} blocks cannot hold {int(context_lens[b])} tokens "
            f"of block_size {block_size}"
        )
    return tables.clamp_min(0)
