"""KV-cache block accounting (pure Python, no torch).

The paged KV cache on every worker is `num_blocks` blocks of `block_size` token slots. The
`BlockManager` on the controller decides which blocks each sequence owns; workers only follow the
block tables they are sent. A sequence holding `n` tokens of K/V owns `ceil(n / block_size)`
blocks: blocks are taken as it grows and all given back at once when it finishes, is aborted or is
preempted. No prefix caching: a block belongs to exactly one sequence.

    manager = BlockManager(num_blocks=1024, block_size=16)
    if manager.can_allocate(seq, num_tokens):   # room for num_tokens tokens of K/V in total?
        manager.allocate(seq, num_tokens)       # grows seq.block_table as needed
    manager.free(seq)                           # all its blocks back; seq.block_table == []
    manager.num_used_blocks, manager.num_free_blocks, manager.usage   # for metrics

Free blocks are handed out lowest id first at the start, then in the order they were freed.
"""

from __future__ import annotations

from collections import deque

from energon.errors import InvalidRequest
from energon.sequence import Sequence


class BlockManager:
    """Owns the free list of KV-cache blocks and fills sequences' block tables."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise InvalidRequest("num_blocks", f"must be >= 1 (got {num_blocks})")
        if block_size < 1:
            raise InvalidRequest("block_size", f"must be >= 1 (got {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0.0 to 1.0."""
        return len(self._used) / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        """Most tokens of K/V the whole cache holds."""
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def num_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that its table holds `num_tokens` tokens (0 if it already does)."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether enough blocks are free for `seq` to hold `num_tokens` tokens in total."""
        return self.num_needed(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Grow `seq.block_table` to hold `num_tokens` tokens; return the new block ids.

        Raises RuntimeError when too few blocks are free (check `can_allocate` first).
        """
        needed = self.num_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(
                f"sequence {seq.seq_id!r} needs {needed} more KV blocks for {num_tokens} tokens "
                f"but only {len(self._free)} are free; call can_allocate first"
            )
        new = [self._free.popleft() for _ in range(needed)]
        self._used.update(new)
        seq.block_table.extend(new)
        return new

    def free(self, seq: Sequence) -> int:
        """Give back every block of `seq` and empty its table; return how many were freed.

        Raises RuntimeError if the table names a block that is not in use (a double free).
        """
        for block in seq.block_table:
            if block not in self._used:
                raise RuntimeError(f"block {block} of sequence {seq.seq_id!r} is not in use")
            self._used.remove(block)
            self._free.append(block)
        freed = len(seq.block_table)
        seq.block_table = []
        return freed
