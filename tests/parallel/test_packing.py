"""Packed batch metadata: offsets, positions, cache slots and logits rows from host lists."""

import pytest
import torch

from energon.parallel.packing import BatchMeta, pack, pad, unpack


def test_pack_concatenates_tokens_and_numbers_positions_per_sequence():
    ids, meta = pack([[5, 6, 7], [8], [9, 10]])
    assert ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert meta.cu_seqlens.tolist() == [0, 3, 4, 6]
    assert meta.cu_seqlens.dtype == torch.int32
    assert meta.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert meta.context_lens.tolist() == [3, 1, 2]
    assert (meta.max_seqlen_q, meta.max_context_len) == (3, 3)
    assert meta.block_tables is None and meta.slot_mapping is None and meta.logits_indices is None


def test_decode_step_positions_follow_cached_context():
    meta = BatchMeta.for_step([1, 2], [4, 7], [[3, 1], [0, 2]], block_size=4, logits_indices="last")
    assert meta.positions.tolist() == [3, 5, 6]
    # seq 0 position 3 -> block 3 offset 3; seq 1 positions 5, 6 -> block 2 offsets 1, 2
    assert meta.slot_mapping.tolist() == [15, 9, 10]
    assert meta.logits_indices.tolist() == [0, 2]
    assert meta.block_tables.tolist() == [[3, 1], [0, 2]]


def test_block_table_too_short_for_context_is_rejected():
    with pytest.raises(ValueError, match="cannot hold 9 tokens"):
        BatchMeta.for_step([9], [9], [[0, 1]], block_size=4)


def test_query_longer_than_context_is_rejected():
    with pytest.raises(ValueError, match="query_len <= context_len"):
        BatchMeta.for_step([3], [2])


def test_pad_right_pads_and_real_rows_pick_tokens_in_packed_order():
    ids, meta, real = pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [1, 2, 3, 4, 0, 0]
    assert meta.padded_shape == (2, 3)
    assert real.tolist() == [0, 1, 2, 3]


def test_unpack_splits_rows_per_sequence():
    parts = unpack(torch.arange(6), [2, 4])
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3, 4, 5]]
