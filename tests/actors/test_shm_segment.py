"""Shared-memory segments within one process: block reuse, claims and refusals (no workers)."""

from __future__ import annotations

import gc

import msgpack
import pytest
import torch

from energon.actors import memcopy, protocol, shm
from energon.errors import ProtocolError

MIB = 1 << 20


@pytest.fixture
def link_pair():
    """(controller's Link, worker's Link) of one Offer, the 'worker' being this process."""
    offer = shm.Offer(64 * MIB, 0)
    worker = shm.accept(offer.meta())
    return offer.accepted(), worker


def test_a_block_is_reused_only_once_the_receivers_tensor_is_gone(link_pair):
    controller, worker = link_pair
    first = protocol.decode(protocol.encode_reply(1, torch.ones(MIB), controller.writer),
                            protocol.Limits(), worker.reader).meta["result"]  # fmt: skip
    frames = protocol.encode_reply(2, torch.ones(MIB), controller.writer)
    second_off = msgpack.unpackb(msgpack.unpackb(frames[0])["meta"]["result"].data)["off"]
    first_off = first.data_ptr() - worker.reader.segment.bytes.ctypes.data
    assert second_off != first_off
    del first
    gc.collect()
    frames = protocol.encode_reply(3, torch.ones(MIB), controller.writer)
    assert msgpack.unpackb(msgpack.unpackb(frames[0])["meta"]["result"].data)["off"] == first_off


def test_a_refused_message_frees_every_block_it_named(link_pair):
    controller, worker = link_pair
    frames = protocol.encode_call(1, "m", (torch.ones(MIB), torch.ones(MIB)), {}, controller.writer)
    with pytest.raises(ProtocolError, match="max_message_bytes"):
        protocol.decode(frames, protocol.Limits(max_message_bytes=5 * MIB), worker.reader)
    gc.collect()
    states = worker.reader.segment.states
    assert not (states == shm.SENT).any() and not (states == shm.CLAIMED).any()


def test_a_block_can_be_taken_once(link_pair):
    controller, worker = link_pair
    frames = protocol.encode_reply(1, torch.ones(MIB), controller.writer)
    kept = protocol.decode(frames, protocol.Limits(), worker.reader)
    with pytest.raises(ProtocolError, match="not sent"):
        protocol.decode(frames, protocol.Limits(), worker.reader)
    assert torch.equal(kept.meta["result"], torch.ones(MIB))


def test_a_block_spec_without_a_link_is_refused(link_pair):
    controller, _ = link_pair
    frames = protocol.encode_reply(1, torch.ones(MIB), controller.writer)
    with pytest.raises(ProtocolError, match="has none") as info:
        protocol.decode(frames, protocol.Limits(), None)
    assert (info.value.msg_id, info.value.kind) == (1, "reply")


def test_a_segment_is_only_accepted_with_its_token():
    offer = shm.Offer(4 * MIB, 0)
    try:
        meta = offer.meta()
        assert shm.accept(meta) is not None
        wrong_token = dict(meta, to_worker=dict(meta["to_worker"], token=b"x" * 16))
        no_such_pid = dict(meta, to_worker=dict(meta["to_worker"], pid=2**22 + 1))
        wrong_size = dict(meta, to_worker=dict(meta["to_worker"], size=8 * MIB))
        for bad in (wrong_token, no_such_pid, wrong_size, None, {"to_worker": 3}):
            assert shm.accept(bad) is None
    finally:
        offer.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t,
        lambda t: t.t(),
        lambda t: t[:, 1::3],
        lambda t: t.view(1, 1024, -1).transpose(1, 2),
        lambda t: t[3:-5, 1:-2],
    ],
    ids=["contiguous", "transposed", "strided", "leading-1", "odd-edges"],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8], ids=str)
def test_big_copies_split_over_threads_are_exact(make, dtype):
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 256, (24 * MIB,), generator=g, dtype=torch.uint8)
    src = make(bits.view(dtype).view(1024 * 4, -1))
    dst = torch.empty(src.numel() * dtype.itemsize, dtype=torch.uint8)
    memcopy.copy_into(dst.numpy(), src)
    assert torch.equal(dst, src.contiguous().view(-1).view(torch.uint8))
