"""The wire between controller and workers: message kinds, msgpack headers, validation.

A message is a ZeroMQ multipart. Frame 0 is a msgpack header `{v, id, kind, method, meta}`; every
tensor, ndarray or large bytes value in `meta` is replaced by a msgpack extension naming the
payload frame it travels as, straight from its own buffer (no pickle, no copy), or, where the two
sides share a host, the shared-memory block it was written to (actors/payload.py, actors/shm.py).
`decode` validates everything it reads and raises ProtocolError for anything malformed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from energon.actors import payload
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
        "shm": (dict, type(None)),  # shared-memory segments to open (shm.Offer.meta), or nil
    },
    # worker -> controller: the actor is built; method name -> True if it is `async def`;
    # shm: whether it opened the offered segments (else tensors travel as frames)
    "ready": {"methods": dict, "shm": bool},
    "call": {"args": list, "kwargs": dict},
    "reply": {"result": object},
    "error": {"type": str, "message": str, "traceback": str},
    "cancel": {},
    "heartbeat": {},
    "shutdown": {},
    "bye": {},
}
KINDS = frozenset(META_SCHEMA)
# kind -> [(key, type(s), the exact types accepted at once)]: bool passes only where named, not
# as an int; object accepts anything
_META_CHECKS = {
    kind: [
        (key, typ, frozenset(typ if isinstance(typ, tuple) else (typ,)) - {object})
        for key, typ in schema.items()
    ]
    for kind, schema in META_SCHEMA.items()
}
_MISSING = object()

MAX_ID = 2**63 - 1
DEFAULT_MAX_MESSAGE_BYTES = 2 * 2**30
DEFAULT_MAX_HEADER_BYTES = 64 * 2**20

_SCALARS = payload.SCALARS
_packb = msgpack.packb
_unpackb = msgpack.unpackb


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


def encode(kind: str, msg_id: int, method: str | None = None, meta: dict | None = None,
           shm=None) -> list:  # fmt: skip
    """Returns the frames of one message: [header, *payloads]; tensors of at least
    shm.min_bytes go into shared memory when shm (a shm.SegmentWriter) is given and has room.
    Raises TypeError for a value that cannot travel (anything but None/bool/int/float/str/bytes/
    list/tuple/str-keyed dict/torch.Tensor/numpy.ndarray)."""
    frames: list = [b""]
    lowered = payload.lower(meta, frames, shm) if meta else {}
    frames[0] = _packb(
        {"v": VERSION, "id": msg_id, "kind": kind, "method": method, "meta": lowered}
    )
    return frames


_EMPTY_CALL = {"args": (), "kwargs": {}}


def encode_call(msg_id: int, method: str, args: tuple, kwargs: dict, shm=None) -> list:
    """encode("call", msg_id, method, {"args": args, "kwargs": kwargs}, shm), faster."""
    frames: list = [b""]
    if args or kwargs:
        meta = {
            "args": payload.lower(args, frames, shm),
            "kwargs": payload.lower(kwargs, frames, shm),
        }
    else:
        meta = _EMPTY_CALL
    frames[0] = _packb({"v": VERSION, "id": msg_id, "kind": "call", "method": method, "meta": meta})
    return frames


def encode_reply(msg_id: int, result: Any, shm=None) -> list:
    """encode("reply", msg_id, None, {"result": result}, shm), faster."""
    frames: list = [b""]
    if type(result) not in _SCALARS:
        result = payload.lower(result, frames, shm)
    meta = {"result": result}
    frames[0] = _packb({"v": VERSION, "id": msg_id, "kind": "reply", "method": None, "meta": meta})
    return frames


# ---------------------------------------------------------------------------------------- decoding


def decode(frames: list, limits: Limits, shm=None) -> Message:
    """Validates and decodes [header, *payloads] (zmq Frames or bytes-like).

    Returns a Message whose meta holds tensors/ndarrays viewing the payload frames, or the
    shared-memory blocks of shm (a shm.SegmentReader), without a copy.
    Raises ProtocolError, naming what is wrong, for any malformed or oversize message; when the
    header itself was readable, the error's `msg_id` and `kind` say which message it was.
    """
    if len(frames) == 1:  # the common case: a header alone
        head = frames[0]
        size = len(head)
    elif frames:
        head = frames[0]
        size = 0
        for f in frames:
            size += len(f)
    else:
        raise ProtocolError("empty message")
    if size > limits.max_message_bytes:
        raise ProtocolError(
            f"message of {size} bytes exceeds max_message_bytes={limits.max_message_bytes}"
        )
    if len(head) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(head)} bytes exceeds {limits.max_header_bytes}")
    payloads = frames[1:]
    if payloads:
        hook = payload.ExtHook(payloads, shm)
    else:  # the common case: no extension at all, or (rarely) only shared-memory blocks
        hook = payload.no_frames if shm is None else payload.blocks_only
    try:
        try:  # (msgpack's defaults: str as str, arrays as lists, map keys str or bytes only)
            obj = _unpackb(head if type(head) is bytes else _buffer(head), ext_hook=hook)
        except payload.NeedsHook:  # nothing taken yet: read it again, taking its blocks
            hook = payload.ExtHook(payloads, shm)
            obj = _unpackb(_buffer(head), ext_hook=hook)
    except ProtocolError as exc:  # no payload frames, yet the header names one
        exc.msg_id, exc.kind = _identify(head)
        raise
    except Exception as exc:  # msgpack raises a zoo of types for garbage input
        if isinstance(hook, payload.ExtHook) and hook.error is not None:
            hook.error.msg_id, hook.error.kind = _identify(head)
            raise hook.error from None
        raise ProtocolError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(hook, payload.ExtHook):
        return _check_header(obj)
    if hook.error is not None:
        hook.error.msg_id, hook.error.kind = _identify_header(obj)
        raise hook.error
    msg = _check_header(obj)
    used, err = hook.used, None
    if size + hook.shm_bytes > limits.max_message_bytes:
        err = ProtocolError(
            f"message of {size + hook.shm_bytes} bytes (shared memory included) exceeds "
            f"max_message_bytes={limits.max_message_bytes}"
        )
    elif len(used) != len(payloads) or sorted(used) != list(range(1, len(frames))):
        err = ProtocolError(
            f"header names frames {sorted(used)} but {len(payloads)} payload frame(s) arrived"
        )
    if err is not None:
        err.msg_id, err.kind = msg.id, msg.kind
        raise err
    return msg


def _identify(head) -> tuple[int | None, str | None]:
    """(id, kind) of a header whose payload specs are bad, or (None, None) if unreadable."""
    try:
        obj = msgpack.unpackb(_buffer(head), ext_hook=lambda code, data: None, raw=False)
    except Exception:
        return None, None
    return _identify_header(obj)


def _identify_header(obj) -> tuple[int | None, str | None]:
    if type(obj) is not dict:
        return None, None
    msg_id, kind = obj.get("id"), obj.get("kind")
    if type(msg_id) is int and 0 <= msg_id <= MAX_ID and type(kind) is str and kind in KINDS:
        return msg_id, kind
    return None, None


def _buffer(frame):
    return frame.buffer if hasattr(frame, "buffer") else frame


def _check_header(obj: Any) -> Message:
    if type(obj) is not dict:
        raise ProtocolError(f"header must be a map (got {type(obj).__name__})")
    get = obj.get
    v, msg_id, kind, method, meta = get("v"), get("id"), get("kind"), get("method"), get("meta")
    if v != VERSION or type(v) is not int:
        raise ProtocolError(f"unknown protocol version {v!r} (this side speaks {VERSION})")
    if type(msg_id) is not int or not 0 <= msg_id <= MAX_ID:
        raise ProtocolError(f"id must be an int in [0, 2**63) (got {msg_id!r})")
    checks = _META_CHECKS.get(kind) if type(kind) is str else None
    if checks is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    err = None
    if method is not None and type(method) is not str:
        err = ProtocolError(f"method must be a str or nil (got {type(method).__name__})")
    elif kind == "call" and not method:
        err = ProtocolError("a call must name its method")
    elif type(meta) is not dict:
        err = ProtocolError(f"meta must be a map (got {type(meta).__name__})")
    else:
        for key, typ, exact in checks:
            value = meta.get(key, _MISSING)
            if value is _MISSING:
                err = ProtocolError(f"{kind} message lacks meta[{key!r}]")
                break
            if type(value) not in exact and (
                typ is not object and (not isinstance(value, typ) or type(value) is bool)
            ):
                err = ProtocolError(f"{kind} meta[{key!r}] has type {type(value).__name__}")
                break
    if err is not None:
        err.msg_id, err.kind = msg_id, kind
        raise err
    return Message(kind, msg_id, method, meta)


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
