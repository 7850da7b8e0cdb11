"""The wire between controller and workers: message kinds, msgpack headers, zero-copy payload frames.

A message is a ZeroMQ multipart. Frame 0 is a msgpack header `{v, id, kind, method, meta}`; every
tensor, ndarray or large bytes value in `meta` is replaced by a msgpack extension holding
`{dtype, shape, frame: k}` and travels as frame k, straight from its own buffer (no pickle, no copy).
`decode` validates everything it reads and raises ProtocolError for anything malformed.

torch and numpy are imported only when a tensor / ndarray frame is encoded or decoded.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from energon.errors import ProtocolError

VERSION = 1

# kind -> the meta keys it must carry and their types. The only place message shapes are defined.
META_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    # worker -> controller, once per channel ("io": the worker's event loop, "sync": its
    # executor thread that runs sync methods in arrival order)
    "hello": {"rank": int, "channel": str, "pid": int, "host": str},
    # controller -> worker sync channel: construct the actor as target(*args, **kwargs)
    "init": {
        "target": str,
        "args": list,
        "kwargs": dict,
        "world_size": int,
        "address": str,
        "heartbeat_interval": (int, float),
        "heartbeat_timeout": (int, float),
    },
    # worker -> controller: the actor is built; method name -> True if it is `async def`
    "ready": {"methods": dict},
    "call": {"args": list, "kwargs": dict},
    "reply": {"result": object},
    "error": {"type": str, "message": str, "traceback": str},
    "cancel": {},
    "heartbeat": {},
    "shutdown": {},
    "bye": {},
}
KINDS = frozenset(META_SCHEMA)

MAX_ID = 2**63 - 1
MAX_DIMS = 64
# bytes values at least this long travel as their own frame; shorter ones stay in the header
BYTES_FRAME_MIN = 64 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 2 * 2**30
DEFAULT_MAX_HEADER_BYTES = 64 * 2**20

EXT_TENSOR = 1
EXT_NDARRAY = 2
EXT_BYTES = 3

_SCALARS = frozenset({type(None), bool, int, float, str})
_PLAIN = _SCALARS | {bytes}
_STR_ONLY = frozenset({str})


class Message(NamedTuple):
    """A decoded, validated message."""

    kind: str
    id: int
    method: str | None
    meta: dict


@dataclass
class Limits:
    """Bounds enforced on every received message."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES


# ---------------------------------------------------------------------------------------- encoding


def encode(kind: str, msg_id: int, method: str | None = None, meta: dict | None = None) -> list:
    """Returns the frames of one message: [header, *payloads]. Raises TypeError for a value
    that cannot travel (anything but None/bool/int/float/str/bytes/list/tuple/str-keyed dict/
    torch.Tensor/numpy.ndarray)."""
    frames: list = [b""]
    lowered = _lower(meta, frames) if meta else {}
    frames[0] = msgpack.packb(
        {"v": VERSION, "id": msg_id, "kind": kind, "method": method, "meta": lowered}
    )
    return frames


def _lower(obj: Any, frames: list) -> Any:
    """obj with every tensor/ndarray/large bytes replaced by an ExtType naming its frame."""
    t = type(obj)
    if t in _SCALARS:
        return obj
    if t is list or t is tuple:
        if set(map(type, obj)) <= _SCALARS:  # the common case, checked at C speed
            return obj
        return [_lower(x, frames) for x in obj]
    if t is dict:
        if not set(map(type, obj)) <= _STR_ONLY:
            raise TypeError("dict keys sent to a worker must be str")
        if set(map(type, obj.values())) <= _SCALARS:
            return obj
        return {k: _lower(v, frames) for k, v in obj.items()}
    if t is bytes or t is bytearray or t is memoryview:
        if len(obj) < BYTES_FRAME_MIN:
            return bytes(obj)
        frames.append(obj)
        return msgpack.ExtType(EXT_BYTES, msgpack.packb({"frame": len(frames) - 1}))
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _lower_tensor(obj, frames, torch)
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return _lower_ndarray(obj, frames, np)
        if isinstance(obj, np.generic):
            return obj.item()
    if isinstance(obj, (bool, int, float, str)):  # subclasses such as IntEnum
        return obj
    raise TypeError(
        f"cannot send a {t.__name__} to or from a worker: use None, bool, int, float, str, "
        "bytes, list, tuple, dict with str keys, torch.Tensor or numpy.ndarray"
    )


def _lower_tensor(t, frames: list, torch) -> msgpack.ExtType:
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"cannot send a {t.layout} / quantized tensor; send a dense one")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    if t.numel():
        frames.append(t.view(-1).view(torch.uint8).numpy())  # a view: the frame is t's memory
    else:
        frames.append(b"")
    spec = {"dtype": dtype, "shape": list(t.shape), "frame": len(frames) - 1}
    return msgpack.ExtType(EXT_TENSOR, msgpack.packb(spec))


def _lower_ndarray(a, frames: list, np) -> msgpack.ExtType:
    if a.dtype.hasobject or a.dtype.fields is not None or a.dtype.subdtype is not None:
        raise TypeError(f"cannot send an ndarray of dtype {a.dtype}; use a plain numeric dtype")
    shape = list(a.shape)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)  # (which would make a 0-d array 1-d: keep `shape`)
    frames.append(a.reshape(-1).view(np.uint8) if a.size else b"")
    spec = {"dtype": a.dtype.str, "shape": shape, "frame": len(frames) - 1}
    return msgpack.ExtType(EXT_NDARRAY, msgpack.packb(spec))


# ---------------------------------------------------------------------------------------- decoding


def decode(frames: list, limits: Limits) -> Message:
    """Validates and decodes [header, *payloads] (zmq Frames or bytes-like).

    Returns a Message whose meta holds tensors/ndarrays viewing the payload frames (no copy).
    Raises ProtocolError, naming what is wrong, for any malformed or oversize message; when the
    header itself was readable, the error's `msg_id` and `kind` say which message it was.
    """
    if not frames:
        raise ProtocolError("empty message")
    size = 0
    for f in frames:
        size += len(f)
    if size > limits.max_message_bytes:
        raise ProtocolError(
            f"message of {size} bytes exceeds max_message_bytes={limits.max_message_bytes}"
        )
    head = frames[0]
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {limits.max_header_bytes}")
    payloads = frames[1:]
    used: list[int] = []
    hook = _ExtHook(payloads, used) if payloads else _no_frames
    try:
        obj = msgpack.unpackb(
            _buffer(head), ext_hook=hook, raw=False, strict_map_key=True, use_list=True
        )
    except ProtocolError as exc:  # a bad payload spec: say which message it was if we can
        exc.msg_id, exc.kind = _identify(head)
        raise
    except Exception as exc:  # msgpack raises a zoo of types for garbage input
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    msg = _check_header(obj)
    if len(used) != len(payloads) or (used and sorted(used) != list(range(1, len(frames)))):
        err = ProtocolError(
            f"header names frames {sorted(used)} but {len(payloads)} payload frame(s) arrived"
        )
        err.msg_id, err.kind = msg.id, msg.kind
        raise err
    return msg


def _identify(head) -> tuple[int | None, str | None]:
    """(id, kind) of a header whose payload specs are bad, or (None, None) if unreadable."""
    try:
        obj = msgpack.unpackb(_buffer(head), ext_hook=lambda code, data: None, raw=False)
        msg_id, kind = obj["id"], obj["kind"]
    except Exception:
        return None, None
    if type(msg_id) is int and 0 <= msg_id <= MAX_ID and kind in KINDS:
        return msg_id, kind
    return None, None


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else frame


def _check_header(obj: Any) -> Message:
    if type(obj) is not dict:
        raise ProtocolError(f"header must be a map (got {type(obj).__name__})")
    v = obj.get("v")
    if v != VERSION or type(v) is not int:
        raise ProtocolError(f"unknown protocol version {v!r} (this side speaks {VERSION})")
    msg_id, kind, method, meta = obj.get("id"), obj.get("kind"), obj.get("method"), obj.get("meta")
    if type(msg_id) is not int or not 0 <= msg_id <= MAX_ID:
        raise ProtocolError(f"id must be an int in [0, 2**63) (got {msg_id!r})")
    if kind not in KINDS or type(kind) is not str:
        raise ProtocolError(f"unknown message kind {kind!r}")
    err = None
    if method is not None and type(method) is not str:
        err = ProtocolError(f"method must be a str or nil (got {type(method).__name__})")
    elif kind == "call" and not method:
        err = ProtocolError("a call must name its method")
    elif type(meta) is not dict:
        err = ProtocolError(f"meta must be a map (got {type(meta).__name__})")
    else:
        for key, typ in META_SCHEMA[kind].items():
            if key not in meta:
                err = ProtocolError(f"{kind} message lacks meta[{key!r}]")
                break
            if typ is not object and (not isinstance(meta[key], typ) or type(meta[key]) is bool):
                err = ProtocolError(f"{kind} meta[{key!r}] has type {type(meta[key]).__name__}")
                break
    if err is not None:
        err.msg_id, err.kind = msg_id, kind
        raise err
    return Message(kind, msg_id, method, meta)


def _no_frames(code: int, data: bytes):
    raise ProtocolError(f"header names a payload frame (ext {code}) but none arrived")


class _ExtHook:
    """msgpack ext_hook turning {dtype, shape, frame} specs into views of the payload frames."""

    __slots__ = ("payloads", "used")

    def __init__(self, payloads: list, used: list):
        self.payloads = payloads
        self.used = used

    def __call__(self, code: int, data: bytes):
        spec = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if type(spec) is not dict:
            raise ProtocolError("payload spec must be a map")
        k = spec.get("frame")
        if type(k) is not int or not 1 <= k <= len(self.payloads) or k in self.used:
            raise ProtocolError(
                f"header names frame {k!r} but frames 1..{len(self.payloads)} arrived"
            )
        self.used.append(k)
        frame = self.payloads[k - 1]
        if code == EXT_BYTES:
            return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
        shape = spec.get("shape")
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise ProtocolError(f"shape must be a list of at most {MAX_DIMS} ints")
        for d in shape:
            if type(d) is not int or d < 0:
                raise ProtocolError(f"shape {shape!r} has a bad dimension")
        dtype = spec.get("dtype")
        if type(dtype) is not str:
            raise ProtocolError("dtype must be a str")
        if code == EXT_TENSOR:
            return _tensor_from(frame, dtype, shape)
        if code == EXT_NDARRAY:
            return _ndarray_from(frame, dtype, shape)
        raise ProtocolError(f"unknown payload kind {code}")


TENSOR_DTYPES = (
    "float64 float32 float16 bfloat16 complex64 complex128 int64 int32 int16 int8 "
    "uint8 uint16 uint32 uint64 bool float8_e4m3fn float8_e5m2"
).split()


def _tensor_from(frame, dtype: str, shape: list):
    import torch

    dt = getattr(torch, dtype, None) if dtype in TENSOR_DTYPES else None
    if not isinstance(dt, torch.dtype):
        raise ProtocolError(f"unsupported tensor dtype {dtype!r}")
    numel = math.prod(shape)
    nbytes = numel * dt.itemsize
    if nbytes != len(frame):
        raise ProtocolError(f"tensor {dtype}{shape} needs {nbytes} bytes, frame has {len(frame)}")
    if numel == 0:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(frame, dtype=dt).view(shape)


def _ndarray_from(frame, dtype: str, shape: list):
    import numpy as np

    try:
        dt = np.dtype(dtype)
    except (TypeError, ValueError):
        raise ProtocolError(f"unsupported ndarray dtype {dtype!r}") from None
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None or dt.itemsize == 0:
        raise ProtocolError(f"unsupported ndarray dtype {dtype!r}")
    nbytes = math.prod(shape) * dt.itemsize
    if nbytes != len(frame):
        raise ProtocolError(f"ndarray {dtype}{shape} needs {nbytes} bytes, frame has {len(frame)}")
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    return np.frombuffer(buf, dtype=dt, count=math.prod(shape)).reshape(shape)


# ------------------------------------------------------------------------------ error payloads


def error_meta(exc: BaseException, tb: str) -> dict:
    """The meta of an "error" reply describing exc."""
    cls = type(exc)
    name = (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )
    return {"type": name, "message": str(exc), "traceback": tb}


# ------------------------------------------------------------------------------------ identities
# Each worker connects two DEALERs: "io" (its event loop: async methods, heartbeats, cancels) and
# "sync" (a thread that runs sync methods in arrival order). Their identities name rank and channel.


def identity(rank: int, channel: str) -> bytes:
    """The ZeroMQ identity of a worker's channel ("io" or "sync")."""
    return b"%d" % rank if channel == "io" else b"%d.sync" % rank


def parse_identity(ident: bytes) -> tuple[int, str] | None:
    """(rank, channel) for a worker identity, or None if ident names no worker channel."""
    head, dot, tail = ident.partition(b".")
    if not head.isdigit() or len(head) > 9 or (dot and tail != b"sync"):
        return None
    return int(head), ("sync" if dot else "io")
