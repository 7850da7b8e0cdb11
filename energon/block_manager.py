"""KV-cache block accounting (pure Python, no torch).

The paged KV cache on every worker is `num_blocks` blocks of `block_size` token slots. The
`BlockManager` on the controller decides which blocks each sequence owns; workers only follow the
block tables they are sent. A sequence holding `n` tokens of K/V owns `ceil(n / block_size)`
blocks: blocks are taken as it grows and all given back at once when it finishes, is aborted or is
preempted.

    manager = BlockManager(num_blocks=1024, block_size=16)
    if manager.can_allocate(seq, num_tokens):   # room for num_tokens tokens of K/V in total?
        manager.allocate(seq, num_tokens)       # grows seq.block_table as needed
    manager.free(seq)                           # all its blocks back; seq.block_table == []
    manager.num_used_blocks, manager.num_free_blocks, manager.usage   # for metrics

Free blocks are handed out lowest id first at the start, then in the order they were freed.

Prefix caching (`prefix_caching=True`, as vLLM's): a full block whose K/V a step has computed
(`register`, when the step has come back, so every stage has written it) is known by its digest,
a hash of every token up to its end (its tokens and its parent's digest). A new sequence
(`match`, then `adopt`) starts with the blocks of its longest known prefix of full blocks, shared
(a count of holders per block), and computes only the rest; at least its last token is always
computed, since its logits are needed. A shared block is never written: a sequence writes only
past its prefix, into blocks of its own. A freed block that holds a digest stays findable while
it is free ("evictable"); it is handed out, and forgotten, only when no block without cached
content is left, least recently freed first (a sequence frees its blocks last to first, so the
tail of a prefix goes before its head, which other prefixes may share). Free blocks are both
kinds.

Pending blocks (for the scheduler's waiting on an in-flight prefix): a full block that a step
just scheduled will compute is findable before it is computed, as pending (`mark_pending`), so
that a new sequence whose next blocks are (`pending_after`) waits for that step, then adopts
it, instead of computing the same tokens again in a block of its own: a burst of requests that
share a new system prompt computes it once (SGLang's in-batch prefix caching). `register` turns
pending blocks into cached ones; `free` (and `forget_pending`, when a sequence is aborted with
its step in flight) drops them, since nobody must wait for a block that will never be
registered. Only a step in flight (or the plan being built) holds pending blocks, so a waiting
sequence waits at most until it returns. The scheduler marks and consults them only with
`wait_for_prefix` (energon/scheduler.py; the Engine's `ENERGON_PREFIX_WAIT=0` turns it off).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from energon.errors import InvalidRequest
from energon.sequence import Sequence


def block_digest(parent: bytes, tokens: list[int]) -> bytes:
    """The digest of a full block: its tokens after `parent`, the digest of the block before it
    (b"" for the first). 16 bytes of BLAKE2b: a collision is as unlikely as a hardware fault."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Owns the free list of KV-cache blocks and fills sequences' block tables."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1:
            raise InvalidRequest("num_blocks", f"must be >= 1 (got {num_blocks})")
        if block_size < 1:
            raise InvalidRequest("block_size", f"must be >= 1 (got {block_size})")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(num_blocks))  # free, holding nothing cached
        self._used: dict[int, int] = {}  # block -> how many sequences hold it
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, cached: oldest first
        self._by_digest: dict[bytes, int] = {}
        self._digest_of: dict[int, bytes] = {}
        self._pending: dict[bytes, int] = {}  # digest -> block a scheduled step is computing
        self.hit_tokens = 0  # tokens new sequences found cached (prefix caching)
        self.queried_tokens = 0  # tokens of the new sequences that looked

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return len(self._used)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a digest (in use or evictable)."""
        return len(self._digest_of)

    @property
    def num_pending_blocks(self) -> int:
        """Full blocks a step in flight computes that are not registered yet (`mark_pending`)."""
        return len(self._pending)

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
        return self.num_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Grow `seq.block_table` to hold `num_tokens` tokens; return the new block ids.

        Raises RuntimeError when too few blocks are free (check `can_allocate` first).
        """
        needed = self.num_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(
                f"sequence {seq.seq_id!r} needs {needed} more KV blocks for {num_tokens} tokens "
                f"but only {self.num_free_blocks} are free; call can_allocate first"
            )
        new = [self._take_free() for _ in range(needed)]
        for block in new:
            self._used[block] = 1
        seq.block_table.extend(new)
        return new

    def free(self, seq: Sequence) -> int:
        """Give back every block of `seq` and empty its table; return how many were freed (a
        shared block stays in use while another sequence holds it).

        Raises RuntimeError if the table names a block that is not in use (a double free).
        """
        plain = []  # freed blocks without cached content, in table order
        for block in reversed(seq.block_table):  # a prefix's tail is evicted before its head
            holders = self._used.get(block)
            if holders is None:
                raise RuntimeError(f"block {block} of sequence {seq.seq_id!r} is not in use")
            if holders > 1:
                self._used[block] = holders - 1
                continue
            del self._used[block]
            if block in self._digest_of:
                self._evictable[block] = None  # the most recently freed
            else:
                plain.append(block)
        self._free.extend(reversed(plain))
        self.forget_pending(seq)
        freed = len(seq.block_table)
        seq.block_table = []
        seq.num_registered_blocks = 0
        return freed

    # ---- prefix caching ------------------------------------------------------------------

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold the longest prefix of `seq`'s tokens in full blocks,
        leaving at least its last token to compute ([] without prefix caching)."""
        if not self.prefix_caching:
            return []
        found = []
        for digest in self._digests(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._by_digest.get(digest)
            if block is None:
                break
            found.append(block)
        return found

    def num_evictable(self, blocks: list[int]) -> int:
        """How many of `blocks` are free now (adopting them takes them off the free count)."""
        return sum(block in self._evictable for block in blocks)

    def adopt(self, seq: Sequence, blocks: list[int]) -> None:
        """Start `seq` (no blocks yet) with `blocks` from `match`: shared, their tokens computed."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id!r} already holds blocks")
        for block in blocks:
            if block in self._evictable:
                del self._evictable[block]
                self._used[block] = 1
            else:
                self._used[block] += 1
        seq.block_table = list(blocks)
        seq.num_registered_blocks = len(blocks)
        if self.prefix_caching:  # without it nothing was looked up
            self.queried_tokens += seq.num_tokens
            self.hit_tokens += len(blocks) * self.block_size

    def register(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Make the full blocks among `seq`'s first `num_computed_tokens` tokens (computed, and
        their ids known) findable by later sequences."""
        if not self.prefix_caching:
            return
        full = num_computed_tokens // self.block_size
        if full <= seq.num_registered_blocks:
            return
        digests = self._digests(seq, full)
        for i in range(seq.num_registered_blocks, full):
            block, digest = seq.block_table[i], digests[i]
            if digest not in self._by_digest and block not in self._digest_of:
                self._by_digest[digest] = block  # else: the same tokens are cached elsewhere
                self._digest_of[block] = digest
        self._drop_pending(seq, full)
        seq.num_registered_blocks = full

    def mark_pending(self, seq: Sequence, num_tokens: int) -> None:
        """Say that a step just scheduled computes `seq`'s first `num_tokens` tokens (their
        blocks allocated): its full blocks that are neither registered nor cached elsewhere nor
        pending already become pending until `register` or `free`. Only blocks of known tokens
        count (a chained step's token is not known yet: no digest of it may be kept)."""
        if not self.prefix_caching:
            return
        full = min(num_tokens, seq.num_tokens) // self.block_size
        if full <= seq.num_registered_blocks:
            return
        digests = self._digests(seq, full)
        for i in range(seq.num_registered_blocks, full):
            digest = digests[i]
            if digest not in self._by_digest and digest not in self._pending:
                self._pending[digest] = seq.block_table[i]

    def pending_after(self, seq: Sequence, cached: list[int]) -> int:
        """How many of `seq`'s blocks right after `cached` (its blocks from `match`) are
        pending, in a row: a step in flight computes them, and `seq` would find them cached
        once that step returns. Only blocks `match` could find count (never its last token's)."""
        n = len(cached)
        last = (seq.num_tokens - 1) // self.block_size  # full blocks match may return
        if not self._pending or n >= last:
            return 0
        digests = self._digests(seq, last)
        run = 0
        while n + run < last and digests[n + run] in self._pending:
            run += 1
        return run

    def forget_pending(self, seq: Sequence) -> None:
        """Drop the pending blocks of `seq` (aborted: its step's blocks will never be
        registered, so no sequence must wait for them)."""
        self._drop_pending(seq, len(seq.block_table))

    def _drop_pending(self, seq: Sequence, count: int) -> None:
        """Drop the pending entries of `seq`'s blocks past its registered ones, up to `count`."""
        if not self._pending:
            return
        digests, table = seq.block_digests, seq.block_table
        for i in range(seq.num_registered_blocks, min(count, len(digests), len(table))):
            if self._pending.get(digests[i]) == table[i]:
                del self._pending[digests[i]]

    def _digests(self, seq: Sequence, count: int) -> list[bytes]:
        """The digests of `seq`'s first `count` full blocks (kept on it: its tokens only grow)."""
        digests, size = seq.block_digests, self.block_size
        for i in range(len(digests), count):
            parent = digests[i - 1] if i else b""
            digests.append(block_digest(parent, seq.token_ids[i * size : (i + 1) * size]))
        return digests

    def _take_free(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)  # the least recently freed
        del self._by_digest[self._digest_of.pop(block)]
        return block
