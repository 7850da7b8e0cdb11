"""Decode steps whose sequences share cached prefix blocks: which ones, and how many keys.

With prefix caching, running sequences point their block tables at the same leading blocks (a
system prompt, a few-shot header). Decode attention reads every sequence's keys on its own, so a
prefix of P tokens shared by N sequences is read N times a layer: for 64 requests after one
1,024-token prefix on opt-13b, 57 GB a step against 26 GB of weights. The cascade (FlashInfer's
word) reads the shared blocks once: one pass a group takes all its members' queries over the
prefix (`energon.parallel.prefix_attention`), each sequence then reads only its own keys past
the prefix, and the decode kernel's split combine merges the two partial softmaxes.

`find_shared_prefixes` groups a decode step's sequences by their block tables, on the host: it
only looks at block ids, so nothing is read back from the device. Two sequences share a block
only through the prefix cache, which shares whole blocks written before: any block a sequence
has filled before its new token is read-only this step.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

MIN_PREFIX_TOKENS = 64  # a group's shared keys at least: shorter ones are not worth a pass
# groups a step at most (those that save the most reads): the graphs' buffers hold as many
MAX_GROUPS = 8
SHARED_PREFIX_ENV = "ENERGON_SHARED_PREFIX"  # "0": every sequence reads its whole context


@dataclass
class SharedPrefixes:
    """A decode step's groups: sequence b's first `prefix_lens[b]` keys are read by its
    group's pass (0: it has none); group g's members are `group_seqs[g, :group_sizes[g]]`
    (indices into the step's sequences, -1 past them) and share `group_lens[g]` keys, read
    through the block table of its first member."""

    prefix_lens: torch.Tensor  # int32 [B]
    group_seqs: torch.Tensor  # int32 [G, M]
    group_sizes: torch.Tensor  # int32 [G]
    group_lens: torch.Tensor  # int32 [G]
    max_prefix_len: int  # the longest group_lens (host int: sizes the pass's grid)
    saved_tokens: int  # key reads a layer saves: sum over groups of (members - 1) x shared keys
    parts: int | None = None  # parts of a prefix the pass's programs take (None: its choice)

    @property
    def num_groups(self) -> int:
        return self.group_lens.shape[0]

    def to(self, device: torch.device | str) -> SharedPrefixes:
        tensors = ("prefix_lens", "group_seqs", "group_sizes", "group_lens")
        return replace(self, **{k: getattr(self, k).to(device, non_blocking=True) for k in tensors})


def find_shared_prefixes(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]] | torch.Tensor,
    block_size: int,
    min_prefix: int = MIN_PREFIX_TOKENS,
    max_groups: int = MAX_GROUPS,
) -> SharedPrefixes | None:
    """The groups of a decode step (one new token a sequence) whose sequences share at least
    `min_prefix` keys of leading blocks, on the host; None when there are none or the step is
    not a decode. `block_tables`: lists, or an int tensor [B, width] padded with -1.

    Where sequences share a first block but part later (two system prompts that begin alike),
    the members of each branch form their own groups whenever that saves more reads than one
    group over the common part."""
    B = len(query_lens)
    if B < 2 or any(q != 1 for q in query_lens):
        return None
    if isinstance(block_tables, torch.Tensor):
        tables = block_tables  # the step message's, read in place: this runs every decode step
    else:
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([list(t) + [-1] * (width - len(t)) for t in block_tables])
    if torch.unique(tables[:, 0]).numel() == B:  # no two sequences share even a first block
        return None
    # blocks each sequence filled before its new token: never written this step
    sealed = [min((c - 1) // block_size, tables.shape[1]) for c in context_lens]
    min_blocks = -(-min_prefix // block_size)
    groups, _ = _branch(tables, sealed, list(range(B)), 0, min_blocks)
    if not groups:
        return None
    groups.sort(key=lambda g: (len(g[0]) - 1) * g[1], reverse=True)
    groups = groups[:max_groups]
    width = max(len(members) for members, _ in groups)
    prefix_lens = torch.zeros(B, dtype=torch.int32)
    seqs = torch.full((len(groups), width), -1, dtype=torch.int32)
    for g, (members, blocks) in enumerate(groups):
        seqs[g, : len(members)] = torch.tensor(members, dtype=torch.int32)
        prefix_lens[members] = blocks * block_size
    lens = [blocks * block_size for _, blocks in groups]
    return SharedPrefixes(
        prefix_lens=prefix_lens,
        group_seqs=seqs,
        group_sizes=torch.tensor([len(m) for m, _ in groups], dtype=torch.int32),
        group_lens=torch.tensor(lens, dtype=torch.int32),
        max_prefix_len=max(lens),
        saved_tokens=sum((len(m) - 1) * n for (m, _), n in zip(groups, lens, strict=True)),
    )


def share_in_parts(
    meta,
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]] | torch.Tensor,
    block_size: int,
) -> bool:
    """Groups for the runs of decodes of a step that mixes kinds (`meta.parts`, a BatchMeta's:
    decodes beside prompt chunks), each run's found among its own sequences and set on its part
    (`part.shared`, on the part's device): attention runs each part on its own, the decodes
    through the paged decode kernel. Whether any run had groups."""
    found, first = False, 0
    for _, part, reads_cache in meta.parts:
        end = first + part.num_seqs
        if reads_cache and part.max_seqlen_q == 1:  # one new token each after cached keys
            groups = find_shared_prefixes(
                query_lens[first:end],
                context_lens[first:end],
                block_tables[first:end],
                block_size,
            )
            if groups is not None:
                part.shared = groups.to(part.context_lens.device)
                found = True
        first = end
    return found


def _branch(
    tables: torch.Tensor, sealed: list[int], members: list[int], col: int, min_blocks: int
) -> tuple[list[tuple[list[int], int]], int]:
    """The best groups among `members`, which agree on their first `col` blocks: (groups as
    (members, shared blocks), key blocks a layer they save). Two members at least."""
    rows = tables[members]
    end = min(sealed[b] for b in members)
    agree = (rows[:, col:end] == rows[:1, col:end]).all(0)
    col += int(agree.to(torch.int64).cumprod(0).sum())  # leading columns all members agree on
    here = ([(members, col)], (len(members) - 1) * col) if col >= min_blocks else ([], 0)
    going_on = [b for b in members if sealed[b] > col]  # members with blocks past the common part
    branches: dict[int, list[int]] = {}
    for b, block in zip(going_on, tables[going_on, col].tolist(), strict=True):
        branches.setdefault(block, []).append(b)
    found, saved = [], 0
    for branch in branches.values():
        if len(branch) < 2:  # a sequence alone past the common part (most of them): no group
            continue
        groups, more = _branch(tables, sealed, branch, col + 1, min_blocks)
        found += groups
        saved += more
    return (found, saved) if saved > here[1] else here
