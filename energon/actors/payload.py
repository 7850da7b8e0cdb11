"""Values in a message: tensors, ndarrays and large bytes as payload frames or shared-memory blocks.

`lower` replaces each such value by a msgpack extension naming where it travels: `{dtype, shape,
frame: k}` for payload frame k (sent straight from the value's own buffer), or `{dtype, shape, seg,
off, nbytes}` for a block of a shared-memory segment (actors/shm.py). `ExtHook` turns the
extensions back into views of the received frames or blocks, validating every field.

torch and numpy are imported only when a tensor / ndarray is encoded or decoded.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import msgpack

from energon.errors import ProtocolError

MAX_DIMS = 64
# bytes values at least this long travel as their own frame; shorter ones stay in the header
BYTES_FRAME_MIN = 64 * 1024

EXT_TENSOR = 1
EXT_NDARRAY = 2
EXT_BYTES = 3
EXT_SHM_TENSOR = 4

SCALARS = frozenset({type(None), bool, int, float, str})
_STR_ONLY = frozenset({str})
_packb = msgpack.packb


def lower(obj: Any, frames: list, shm) -> Any:
    """obj with every tensor/ndarray/large bytes replaced by an ExtType naming its frame (or its
    shared-memory block)."""
    t = type(obj)
    if t in SCALARS:
        return obj
    if t is list or t is tuple:
        if set(map(type, obj)) <= SCALARS:  # the common case, checked at C speed
            return obj
        return [lower(x, frames, shm) for x in obj]
    if t is dict:
        if not set(map(type, obj)) <= _STR_ONLY:
            raise TypeError("dict keys sent to a worker must be str")
        if set(map(type, obj.values())) <= SCALARS:
            return obj
        return {k: lower(v, frames, shm) for k, v in obj.items()}
    if t is bytes or t is bytearray or t is memoryview:
        if len(obj) < BYTES_FRAME_MIN:
            return bytes(obj)
        frames.append(obj)
        return msgpack.ExtType(EXT_BYTES, _packb({"frame": len(frames) - 1}))
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return _lower_tensor(obj, frames, torch, shm)
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


def _lower_tensor(t, frames: list, torch, shm) -> msgpack.ExtType:
    if t.layout != torch.strided or t.is_quantized:
        raise TypeError(f"cannot send a {t.layout} / quantized tensor; send a dense one")
    t = t.detach()
    dtype = str(t.dtype).removeprefix("torch.")
    nbytes = t.numel() * t.element_size()
    if shm is not None and nbytes and nbytes >= shm.min_bytes:
        block = shm.put(t)  # one copy, from any strides and device, straight into the block
        if block is not None:
            block["dtype"], block["shape"] = dtype, list(t.shape)
            return msgpack.ExtType(EXT_SHM_TENSOR, _packb(block))
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.numel():
        frames.append(t.view(-1).view(torch.uint8).numpy())  # a view: the frame is t's memory
    else:
        frames.append(b"")
    spec = {"dtype": dtype, "shape": list(t.shape), "frame": len(frames) - 1}
    return msgpack.ExtType(EXT_TENSOR, _packb(spec))


def _lower_ndarray(a, frames: list, np) -> msgpack.ExtType:
    if a.dtype.hasobject or a.dtype.fields is not None or a.dtype.subdtype is not None:
        raise TypeError(f"cannot send an ndarray of dtype {a.dtype}; use a plain numeric dtype")
    shape = list(a.shape)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)  # (which would make a 0-d array 1-d: keep `shape`)
    frames.append(a.reshape(-1).view(np.uint8) if a.size else b"")
    spec = {"dtype": a.dtype.str, "shape": shape, "frame": len(frames) - 1}
    return msgpack.ExtType(EXT_NDARRAY, msgpack.packb(spec))


class NeedsHook(Exception):
    """Raised by blocks_only: the header holds an extension; decode it with an ExtHook."""


def blocks_only(code: int, data: bytes):
    """ext_hook for a message without payload frames on a link with shared memory: such a
    message rarely holds an extension, so an ExtHook is made only when one turns up."""
    raise NeedsHook


def no_frames(code: int, data: bytes):
    if code == EXT_SHM_TENSOR:
        raise ProtocolError("header names a shared-memory block but this link has none")
    raise ProtocolError(f"header names a payload frame (ext {code}) but none arrived")


class ExtHook:
    """msgpack ext_hook turning {dtype, shape, frame} specs into views of the payload frames and
    {dtype, shape, seg, off, nbytes} specs into views of shared-memory blocks.

    It records the first error instead of raising it, so that every block a message names is
    claimed (and freed with the message) even when the message is refused.
    """

    __slots__ = ("payloads", "shm", "used", "shm_bytes", "error")

    def __init__(self, payloads: list, shm):
        self.payloads = payloads
        self.shm = shm
        self.used: list[int] = []
        self.shm_bytes = 0
        self.error: ProtocolError | None = None

    def __call__(self, code: int, data: bytes):
        try:
            return self._convert(code, data)
        except ProtocolError as exc:
            if self.error is None:
                self.error = exc
            return None

    def _convert(self, code: int, data: bytes):
        try:
            spec = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception:
            raise ProtocolError("payload spec is not valid msgpack") from None
        if type(spec) is not dict:
            raise ProtocolError("payload spec must be a map")
        if code == EXT_SHM_TENSOR:
            return self._shm_tensor(spec)
        k = spec.get("frame")
        if type(k) is not int or not 1 <= k <= len(self.payloads) or k in self.used:
            raise ProtocolError(
                f"header names frame {k!r} but frames 1..{len(self.payloads)} arrived"
            )
        self.used.append(k)
        frame = self.payloads[k - 1]
        if code == EXT_BYTES:
            return frame.bytes if hasattr(frame, "bytes") else bytes(frame)
        shape, dtype = _shape_and_dtype(spec)
        if code == EXT_TENSOR:
            return _tensor_from(frame, dtype, shape)
        if code == EXT_NDARRAY:
            return _ndarray_from(frame, dtype, shape)
        raise ProtocolError(f"unknown payload kind {code}")

    def _shm_tensor(self, spec: dict):
        if self.shm is None:
            raise ProtocolError("header names a shared-memory block but this link has none")
        shape, dtype = _shape_and_dtype(spec)
        dt = _torch_dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize
        tensor = self.shm.take(spec, dt, shape, nbytes)
        self.shm_bytes += nbytes
        return tensor


def _shape_and_dtype(spec: dict) -> tuple[list, str]:
    shape = spec.get("shape")
    if type(shape) is not list or len(shape) > MAX_DIMS:
        raise ProtocolError(f"shape must be a list of at most {MAX_DIMS} ints")
    for d in shape:
        if type(d) is not int or d < 0:
            raise ProtocolError(f"shape {shape!r} has a bad dimension")
    dtype = spec.get("dtype")
    if type(dtype) is not str:
        raise ProtocolError("dtype must be a str")
    return shape, dtype


TENSOR_DTYPES = (
    "float64 float32 float16 bfloat16 complex64 complex128 int64 int32 int16 int8 "
    "uint8 uint16 uint32 uint64 bool float8_e4m3fn float8_e5m2"
).split()


def _torch_dtype(dtype: str):
    import torch

    dt = getattr(torch, dtype, None) if dtype in TENSOR_DTYPES else None
    if not isinstance(dt, torch.dtype):
        raise ProtocolError(f"unsupported tensor dtype {dtype!r}")
    return dt


def _tensor_from(frame, dtype: str, shape: list):
    import torch

    dt = _torch_dtype(dtype)
    numel = math.prod(shape)
    nbytes = numel * dt.itemsize
    if nbytes != len(frame):
        raise ProtocolError(f"tensor {dtype}{shape} needs {nbytes} bytes, frame has {len(frame)}")
    if numel == 0:
        return torch.empty(shape, dtype=dt)
    buf = memoryview(frame)
    if buf.readonly:  # a frame received as bytes (zmq.Frame views, copy=False, are writable)
        buf = bytearray(buf)  # copied, so the tensor may be written like every other one
    return torch.frombuffer(buf, dtype=dt).view(shape)


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
