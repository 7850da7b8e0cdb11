"""The wire format: values round-trip exactly, malformed input raises ProtocolError and nothing else."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from energon.actors import protocol
from energon.actors.protocol import Limits, decode, encode
from energon.errors import ProtocolError

LIMITS = Limits()


def wire(frames: list) -> list:
    """What the receiver gets: every frame as its own writable buffer (like a zmq.Frame)."""
    return [bytes(frames[0])] + [bytearray(memoryview(f).cast("B")) for f in frames[1:]]


def roundtrip(value):
    msg = decode(wire(encode("reply", 7, None, {"result": value})), LIMITS)
    assert (msg.kind, msg.id) == ("reply", 7)
    return msg.meta["result"]


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def header(**fields) -> bytes:
    h = {
        "v": protocol.VERSION,
        "id": 1,
        "kind": "call",
        "method": "m",
        "meta": {"args": [], "kwargs": {}},
    }
    h.update(fields)
    return msgpack.packb(h)


DTYPES = [
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64,
    torch.complex128, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


def random_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(
        0, 256, (int(np.prod(shape)) * dtype.itemsize,), generator=g, dtype=torch.uint8
    )
    return bits.view(dtype).reshape(shape)  # arbitrary bit patterns, NaNs included


def test_plain_values_roundtrip_with_tuples_as_lists():
    value = {"a": [1, 2.5, "x", None, True], "b": (3, (4, b"raw")), "c": {"d": -(2**63)}}
    assert roundtrip(value) == {
        "a": [1, 2.5, "x", None, True],
        "b": [3, [4, b"raw"]],
        "c": {"d": -(2**63)},
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5), (2, 3, 4)], ids=str)
def test_tensor_roundtrips_bit_exact(dtype, shape):
    t = random_tensor(dtype, shape)
    out = roundtrip(t)
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert raw_bytes(out) == raw_bytes(t)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: t.t(),
        lambda t: t[:, ::2],
        lambda t: t[1:, 1:3],
        lambda t: t[0].expand(4, 6),
        lambda t: t.t().conj() if t.is_complex() else t.t(),
    ],
    ids=["transpose", "step", "slice", "expand", "conj"],
)
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float32, torch.complex64, torch.int8], ids=str
)
def test_non_contiguous_views_arrive_as_their_values(make, dtype):
    view = make(random_tensor(dtype, (4, 6), seed=3))
    out = roundtrip(view)
    assert out.is_contiguous() and out.shape == view.shape
    assert raw_bytes(out) == raw_bytes(view.resolve_conj())


def test_tensor_travels_from_its_own_memory():
    t = torch.arange(1 << 16, dtype=torch.float32)
    frames = encode("reply", 1, None, {"result": t})
    assert frames[1].__array_interface__["data"][0] == t.data_ptr()


def test_decoded_tensor_is_a_view_of_the_frame():
    frames = wire(encode("reply", 1, None, {"result": torch.zeros(4, dtype=torch.int32)}))
    out = decode(frames, LIMITS).meta["result"]
    frames[1][0] = 9  # the received buffer, changed after decoding
    assert out[0].item() == 9


def test_a_tensor_from_a_read_only_frame_is_its_own_writable_copy():
    frames = encode("reply", 1, None, {"result": torch.zeros(4, dtype=torch.int32)})
    received = [bytes(f) for f in frames]  # frames received with copy=True: read-only bytes
    out = decode(received, LIMITS).meta["result"]
    out.add_(7)  # must not write into an immutable bytes object
    assert received[1] == bytes(16)
    assert out.tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize(
    "array",
    [np.arange(12, dtype=np.float16).reshape(3, 4), np.ones((2, 3), dtype=np.int64, order="F")[:, ::2],
     np.array([True, False]), np.zeros((0, 5), dtype=np.uint32), np.array(2.5)],
    ids=["f16", "fortran-strided", "bool", "empty", "0d"],
)  # fmt: skip
def test_ndarray_roundtrips(array):
    out = roundtrip(array)
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_large_bytes_travel_as_a_frame_and_small_ones_inline():
    big, small = bytes(range(256)) * 1024, b"abc"
    frames = encode("reply", 1, None, {"result": [big, small]})
    assert len(frames) == 2 and frames[1] is big
    assert roundtrip([big, small]) == [big, small]


@pytest.mark.parametrize("value", [object(), {1: "int key"}, {1, 2}, torch.zeros(2).to_sparse()])
def test_unsendable_values_raise_type_error(value):
    with pytest.raises(TypeError):
        encode("call", 1, "m", {"args": [value], "kwargs": {}})


@pytest.mark.parametrize(
    "frames, problem",
    [
        ([], "empty"),
        ([b"\xc1"], "msgpack"),
        ([msgpack.packb([1, 2])], "map"),
        ([header(v=2)], "version"),
        ([header(v="1")], "version"),
        ([header(id="7")], "id"),
        ([header(id=-1)], "id"),
        ([header(kind="explode")], "kind"),
        ([header(method=5)], "method"),
        ([header(method=None)], "method"),
        ([header(meta=[1])], "meta"),
        ([header(meta={"args": []})], "kwargs"),
        ([header(meta={"args": {}, "kwargs": {}})], "args"),
        ([header(kind="hello", meta={"rank": True, "channel": "io", "pid": 1, "host": "h"})], "rank"),
        ([header(meta={"args": [msgpack.ExtType(1, msgpack.packb({"dtype": "float32", "shape": [2], "frame": 1}))], "kwargs": {}})], "frame"),
        ([header(), b"extra"], "frames"),
        ([header(meta={"args": [msgpack.ExtType(1, msgpack.packb({"dtype": "float32", "shape": [3], "frame": 1}))], "kwargs": {}}), b"12345678"], "bytes"),
        ([header(meta={"args": [msgpack.ExtType(1, msgpack.packb({"dtype": "object", "shape": [1], "frame": 1}))], "kwargs": {}}), b"1234"], "dtype"),
        ([header(meta={"args": [msgpack.ExtType(1, msgpack.packb({"dtype": "int8", "shape": [-1], "frame": 1}))], "kwargs": {}}), b"1"], "dimension"),
        ([header(meta={"args": [msgpack.ExtType(2, msgpack.packb({"dtype": "|O", "shape": [1], "frame": 1}))], "kwargs": {}}), b"12345678"], "dtype"),
        ([header(meta={"args": [msgpack.ExtType(9, msgpack.packb({"dtype": "int8", "shape": [1], "frame": 1}))], "kwargs": {}}), b"1"], "payload"),
    ],
)  # fmt: skip
def test_malformed_messages_raise_protocol_error(frames, problem):
    with pytest.raises(ProtocolError, match=problem):
        decode(frames, LIMITS)


def test_errors_after_a_readable_header_name_the_message():
    with pytest.raises(ProtocolError) as info:
        decode(
            [
                header(id=42, meta={"args": "no"}),
            ],
            LIMITS,
        )
    assert (info.value.msg_id, info.value.kind) == (42, "call")


def test_oversize_message_and_header_are_refused():
    frames = encode("call", 1, "m", {"args": [b"x" * 100_000], "kwargs": {}})
    with pytest.raises(ProtocolError, match="max_message_bytes"):
        decode(frames, Limits(max_message_bytes=50_000))
    with pytest.raises(ProtocolError, match="header"):
        decode([header(meta={"args": ["y" * 5000], "kwargs": {}})], Limits(max_header_bytes=1000))


def test_identities_name_rank_and_channel():
    assert protocol.parse_identity(protocol.identity(12, "io")) == (12, "io")
    assert protocol.parse_identity(protocol.identity(3, "sync")) == (3, "sync")
    for bad in (b"", b"x", b"1.io", b"-1", b"1" * 20, b"\x00\x01"):
        assert protocol.parse_identity(bad) is None


def test_importing_energon_actors_does_not_import_torch():
    code = "import sys, energon.actors; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------------ fuzzing

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    | st.builds(lambda c, d: msgpack.ExtType(c, msgpack.packb(d)), st.integers(0, 4),
                st.dictionaries(st.sampled_from(["dtype", "shape", "frame"]), inner, max_size=3)),
    max_leaves=12,
)  # fmt: skip


def decode_or_protocol_error(frames):
    try:
        msg = decode(frames, Limits(max_message_bytes=1 << 20))
    except ProtocolError:
        return None
    assert msg.kind in protocol.KINDS and isinstance(msg.meta, dict)
    return msg


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_fuzz_random_frames_only_raise_protocol_error(frames):
    decode_or_protocol_error(frames)


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["v", "id", "kind", "method", "meta", "x"]), msgpack_values, max_size=6),
    st.lists(st.binary(max_size=32), max_size=3),
)  # fmt: skip
def test_fuzz_structured_headers_only_raise_protocol_error(head, payloads):
    decode_or_protocol_error([msgpack.packb(head), *payloads])


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_messages_only_raise_protocol_error(data):
    value = {"t": torch.arange(6, dtype=torch.int16).reshape(2, 3), "a": np.ones(3), "s": "x" * 3}
    frames = [bytearray(f) for f in wire(encode("call", 5, "go", {"args": [value], "kwargs": {}}))]
    for _ in range(data.draw(st.integers(1, 4))):
        k = data.draw(st.integers(0, len(frames) - 1))
        action = data.draw(st.sampled_from(["flip", "truncate", "drop", "dup"]))
        if action == "flip" and frames[k]:
            i = data.draw(st.integers(0, len(frames[k]) - 1))
            frames[k][i] ^= data.draw(st.integers(1, 255))
        elif action == "truncate":
            del frames[k][data.draw(st.integers(0, len(frames[k]))) :]
        elif action == "drop" and len(frames) > 1:
            del frames[k]
        elif action == "dup":
            frames.append(bytearray(frames[k]))
    decode_or_protocol_error(frames)
