"""Grouping a decode step's sequences by the prefix blocks their tables share (host only)."""

from __future__ import annotations

import pytest
import torch

from energon.parallel.shared_prefix import find_shared_prefixes


def groups(shared):
    """{frozenset(members): shared keys} of a SharedPrefixes, with its per-sequence lengths
    checked against it."""
    found = {}
    for g in range(shared.num_groups):
        size = int(shared.group_sizes[g])
        members = shared.group_seqs[g, :size].tolist()
        assert (shared.group_seqs[g, size:] == -1).all()
        found[frozenset(members)] = int(shared.group_lens[g])
        assert all(int(shared.prefix_lens[b]) == found[frozenset(members)] for b in members)
    grouped = {b for members in found for b in members}
    assert all(
        int(shared.prefix_lens[b]) == 0 for b in range(len(shared.prefix_lens)) if b not in grouped
    )
    return found


def test_sequences_after_one_prefix_form_one_group():
    # blocks of 4 tokens; 0-3 a shared 16-token prefix, then each sequence's own blocks
    tables = [[0, 1, 2, 3, 10], [0, 1, 2, 3, 11, 12], [0, 1, 2, 3], [20, 21]]
    contexts = [18, 24, 16, 8]  # the third's new token is its prefix's last: 3 blocks sealed
    shared = find_shared_prefixes([1] * 4, contexts, tables, 4, min_prefix=8)
    assert groups(shared) == {frozenset({0, 1, 2}): 12}
    assert shared.saved_tokens == 2 * 12 and shared.max_prefix_len == 12


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_padded_tensor_tables_as_the_step_message_carries_them(dtype):
    tables = torch.tensor([[5, 6, 7, -1], [5, 6, 8, 9], [5, 6, 7, 4]], dtype=dtype)
    shared = find_shared_prefixes([1] * 3, [12, 16, 15], tables, 4, min_prefix=4)
    # 0 and 2 share blocks 5, 6, 7 (12 keys); all three share 5, 6 (8 keys): 2 x 8 = 16 saved
    # by one group beats 1 x 12 by the pair
    assert groups(shared) == {frozenset({0, 1, 2}): 8}


def test_branches_that_save_more_form_their_own_groups():
    # two system prompts that begin with the same block, each followed by its own 5 blocks
    a, b = [0, 1, 2, 3, 4, 5], [0, 6, 7, 8, 9, 10]
    tables = [a + [20 + i] for i in range(3)] + [b + [30 + i] for i in range(3)]
    shared = find_shared_prefixes([1] * 6, [25] * 6, tables, 4, min_prefix=4)
    assert groups(shared) == {frozenset({0, 1, 2}): 24, frozenset({3, 4, 5}): 24}
    assert shared.saved_tokens == 2 * 2 * 24


def test_nothing_to_share():
    tables = [[0, 1], [2, 3], [4]]
    assert find_shared_prefixes([1] * 3, [8, 8, 4], tables, 4, min_prefix=4) is None
    # too short a shared prefix, a single sequence, a step that is not a decode
    assert find_shared_prefixes([1, 1], [9, 9], [[0, 1, 2], [0, 1, 3]], 4, min_prefix=12) is None
    assert find_shared_prefixes([1], [9], [[0, 1, 2]], 4, min_prefix=4) is None
    assert find_shared_prefixes([2, 1], [9, 9], [[0, 1, 2], [0, 1, 3]], 4, min_prefix=4) is None


def test_most_saving_groups_kept_under_the_cap():
    tables = [[0, 1, 2, 9], [0, 1, 2, 8], [3, 4, 7], [3, 4, 6], [3, 4, 5]]
    shared = find_shared_prefixes([1] * 5, [13, 13, 9, 9, 9], tables, 4, min_prefix=4, max_groups=1)
    assert groups(shared) == {frozenset({2, 3, 4}): 8}  # 2 x 8 saved beats 1 x 12


def test_a_mixed_step_groups_each_run_of_decodes_among_itself():
    # blocks of 16; blocks 0-4 an 80-token prefix every sequence but the fresh prompt starts
    # with. The step as the scheduler orders it: decodes of sequences 0 and 1, a prompt chunk of
    # 2 after the cached prefix, decodes of 3 and 4, then a fresh prompt: four runs (parts)
    from energon.parallel.packing import BatchMeta
    from energon.parallel.shared_prefix import share_in_parts

    prefix = [0, 1, 2, 3, 4]
    tables = [prefix + [10], prefix + [11], prefix + [12], prefix + [13, 14], prefix + [15], [16]]
    query_lens = [1, 1, 5, 1, 1, 9]
    context_lens = [81, 90, 85, 100, 96, 9]
    meta = BatchMeta.for_step(query_lens, context_lens, tables, 16)
    assert [part.num_seqs for _, part, _ in meta.parts] == [2, 1, 2, 1]
    assert share_in_parts(meta, query_lens, context_lens, tables, 16)
    decodes, chunk, more, fresh = (part for _, part, _ in meta.parts)
    # each run's members are its own indices; sequence 0's new token is key 80, past the prefix
    assert groups(decodes.shared) == {frozenset({0, 1}): 80}
    assert groups(more.shared) == {frozenset({0, 1}): 80}
    assert chunk.shared is None and fresh.shared is None and meta.shared is None


def test_a_mixed_step_without_shared_blocks_among_its_decodes_has_no_groups():
    from energon.parallel.packing import BatchMeta
    from energon.parallel.shared_prefix import share_in_parts

    prefix = [0, 1, 2, 3, 4]
    # the chunk shares the decodes' prefix, but a group is made of decodes only
    tables = [prefix + [10], [20, 21, 22, 23, 24, 25], prefix + [12]]
    query_lens, context_lens = [1, 1, 5], [81, 90, 85]
    meta = BatchMeta.for_step(query_lens, context_lens, tables, 16)
    assert not share_in_parts(meta, query_lens, context_lens, tables, 16)
    assert all(part.shared is None for _, part, _ in meta.parts)
