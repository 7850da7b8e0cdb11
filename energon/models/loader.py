"""Hugging Face safetensors checkpoints → parameters, each rank reading only its own slices.

For every parameter the model keeps (after its stage was cut), the loader opens the checkpoint
tensor lazily with `safe_open(...).get_slice(name)` and hands a `TensorReader` to the parameter's
`weight_loader`, which indexes only its shard; nothing else is read from disk. Every read is
recorded in a `LoadReport`. Presets get seeded random weights instead, made on the target device.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from energon.errors import CheckpointError
from energon.parallel.layers import default_weight_loader

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class Read:
    tensor: str  # checkpoint tensor name
    file: str  # safetensors file it came from ("" for random init)
    index: str  # the slices read, e.g. "[0:32, :]"
    bytes: int  # bytes read from the file (in the checkpoint's dtype)


@dataclass
class LoadReport:
    """What a rank read: one `Read` per slice (`source` is the folder, or "random")."""

    source: str
    reads: list[Read] = field(default_factory=list)

    @property
    def tensors(self) -> int:
        return len({r.tensor for r in self.reads})

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.reads)

    def to_dict(self) -> dict:
        """Plain values for the wire: source, tensors, bytes, reads [[tensor, file, index, bytes]]."""
        return {
            "source": self.source,
            "tensors": self.tensors,
            "bytes": self.bytes,
            "reads": [[r.tensor, r.file, r.index, r.bytes] for r in self.reads],
        }


def _describe(index, ndim: int) -> str:
    if index is Ellipsis or index == (Ellipsis,):
        return "[" + ", ".join([":"] * ndim) + "]"
    index = index if isinstance(index, tuple) else (index,)
    parts = []
    for s in index:
        if isinstance(s, slice):
            parts.append(f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}")
        else:
            parts.append(str(s))
    parts += [":"] * (ndim - len(parts))
    return "[" + ", ".join(parts) + "]"


class TensorReader:
    """One checkpoint tensor, read lazily: `.name`, `.shape`, `.dtype`, `reader[index]` → Tensor
    in the target dtype (only the indexed slices are read)."""

    def __init__(self, handle, name: str, file: str, target_dtype: torch.dtype, report: LoadReport):
        self._slice = handle.get_slice(name)
        self.name, self.file = name, file
        self.shape = tuple(self._slice.get_shape())
        self.dtype = SAFETENSORS_DTYPES.get(self._slice.get_dtype(), self._slice.get_dtype())
        self._target, self._report = target_dtype, report

    def __getitem__(self, index) -> torch.Tensor:
        t = self._slice[index]
        nbytes = t.numel() * t.element_size()
        self._report.reads.append(
            Read(self.name, self.file, _describe(index, len(self.shape)), nbytes)
        )
        return t.to(self._target)


def checkpoint_files(folder: Path) -> dict[str, str]:
    """Tensor name → safetensors file name, from model.safetensors or its sharded index.

    Raises CheckpointError naming the missing weights file or index entry.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot read {index}: {e}") from e
        for file in sorted(set(weight_map.values())):
            if not (folder / file).is_file():
                raise CheckpointError(f"missing {folder / file}, listed in {index.name}")
        return weight_map
    single = folder / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(
            f"missing weights in {folder}: need model.safetensors or model.safetensors.index.json"
        )
    with safe_open(single, framework="pt") as f:
        return {name: single.name for name in f.keys()}


def _candidates(model: nn.Module, name: str) -> list[str]:
    """Checkpoint names that may hold parameter `name`: itself, the tensor it is tied to, and the
    name without the base-model prefix (checkpoints saved from the bare model, e.g. `h.0...`)."""
    names = [name]
    tied = getattr(model, "tied_weights", {}).get(name)
    if tied:
        names.append(tied)
    names += [n.split(".", 1)[1] for n in list(names) if "." in n]
    return names


def load_weights(model: nn.Module, folder: str | Path, state=None) -> LoadReport:
    """Fill every parameter `model` holds from the checkpoint in `folder`; returns the LoadReport.

    Raises CheckpointError for a missing weights file, a tensor missing from the checkpoint, or a
    checkpoint tensor whose shape is not the parameter's full shape (name, expected, found).
    """
    folder = Path(folder)
    weight_map = checkpoint_files(folder)
    report = LoadReport(str(folder))
    handles = {}
    try:
        for name, param in model.named_parameters():
            source = next((n for n in _candidates(model, name) if n in weight_map), None)
            if source is None:
                raise CheckpointError(f"tensor {name} is missing from the checkpoint in {folder}")
            file = weight_map[source]
            if file not in handles:
                handles[file] = safe_open(folder / file, framework="pt")
            reader = TensorReader(handles[file], source, file, param.dtype, report)
            loader = getattr(param, "weight_loader", default_weight_loader)
            with torch.no_grad():
                loader(param, reader)
    finally:
        handles.clear()
    return report


# -- random weights for presets ---------------------------------------------------------------
#
# A preset's weights are a pure function of (seed, checkpoint tensor name, global element index):
# a counter-based hash (splitmix64) of the index in the FULL tensor, so every layout computes, for
# its own shard, exactly the values the full tensor holds there, and no rank ever materialises
# more than its shard. Values go through the parameter's weight_loader like a checkpoint read, so
# sharded, fused and transposed parameters slice the same virtual tensor that tp=1 sees whole.

_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (the golden ratio in 64 bits)
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_CHUNK = 1 << 24  # elements hashed at once: a few int64 temporaries of 128 MiB each
_STD = 0.02
# Irwin-Hall: the sum of the hash's four 16-bit fields, centred, has variance 4 (2^32 - 1) / 12.
_IH_SCALE = _STD / math.sqrt(4 * ((1 << 32) - 1) / 12)


def _signed(x: int) -> int:
    """A 64-bit pattern as the int64 torch stores (two's complement)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >> 63 else x


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 patterns, in place (products wrap modulo 2^64)."""
    x ^= _shift_right(x, 30)
    x *= _signed(_MIX1)
    x ^= _shift_right(x, 27)
    x *= _signed(_MIX2)
    x ^= _shift_right(x, 31)
    return x


def _tensor_key(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def hashed_normal(key: int, index: torch.Tensor) -> torch.Tensor:
    """float32 values ~ N(0, 0.02) (Irwin-Hall of 4 uniforms: std exactly 0.02, bounded at
    +-3.46 std) for int64 global element indices, a pure function of (key, index)."""
    x = index * _signed(_GAMMA)
    x += _signed(key + _GAMMA)
    x = _mix(x)
    total = x & 0xFFFF
    for shift in (16, 32):
        total += _shift_right(x, shift) & 0xFFFF
    total += _shift_right(x, 48)
    # integers below 2^18 convert exactly; one correctly rounded multiply: identical on every path
    return (total - 2 * 0xFFFF).to(torch.float32) * _IH_SCALE


class RandomTensor:
    """A virtual checkpoint tensor for `weight_loader`s: `.name`, `.shape`, `.dtype`, and
    `reader[index]` -> only the indexed region, computed on `device` in row chunks.

    `fill` is "normal" (hashed values) or a constant (0.0 for biases, 1.0 for norm weights).
    """

    def __init__(self, name, shape, dtype, device, key, fill, report: LoadReport):
        self.name, self.shape, self.dtype = name, tuple(shape), dtype
        self.device, self.key, self.fill, self._report = device, key, fill, report

    def _ranges(self, index) -> list[range | int]:
        index = index if isinstance(index, tuple) else (index,)
        if any(i is Ellipsis for i in index):
            at = next(k for k, i in enumerate(index) if i is Ellipsis)
            fill = [slice(None)] * (len(self.shape) - len(index) + 1)
            index = index[:at] + tuple(fill) + index[at + 1 :]
        index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
        out: list[range | int] = []
        for i, size in zip(index, self.shape, strict=True):
            out.append(range(size)[i] if isinstance(i, slice) else range(size)[i])
        return out

    def __getitem__(self, index) -> torch.Tensor:
        ranges = self._ranges(index)
        shape = [len(r) for r in ranges if isinstance(r, range)]
        out = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._report.reads.append(
            Read(self.name, "", _describe(index, len(self.shape)), out.numel() * out.element_size())
        )
        if self.fill != "normal":
            return out.fill_(self.fill)
        # flat global index = sum over dims of position * stride; rows of the first kept dim in chunks
        strides = [math.prod(self.shape[d + 1 :]) for d in range(len(self.shape))]
        base = sum(r * s for r, s in zip(ranges, strides, strict=True) if isinstance(r, int))
        dims = [(r, s) for r, s in zip(ranges, strides, strict=True) if isinstance(r, range)]
        if not dims:
            return out.copy_(hashed_normal(self.key, torch.tensor(base, device=self.device)))
        (rows, row_stride), rest = dims[0], dims[1:]
        inner = torch.zeros((), dtype=torch.int64, device=self.device) + base
        for r, s in rest:  # broadcast the trailing dims' offsets into one [*rest] index
            inner = inner.unsqueeze(-1) + _arange(r, self.device) * s
        per_row = max(1, inner.numel())
        step = max(1, _CHUNK // per_row)
        flat = out.view(len(rows), per_row)
        for lo in range(0, len(rows), step):
            chunk = _arange(rows[lo : lo + step], self.device) * row_stride
            index = chunk.view(-1, *([1] * len(rest))) + inner
            flat[lo : lo + len(chunk)] = hashed_normal(self.key, index).view(len(chunk), per_row)
        return out


def _arange(r: range, device) -> torch.Tensor:
    return torch.arange(r.start, r.stop, r.step, dtype=torch.int64, device=device)


def _full_shapes(param: nn.Parameter) -> list[tuple[int, ...]]:
    """Shapes the parameter's checkpoint tensor may have: its full (unsharded) shape, then for
    2-D its transpose (Conv1D layouts, read by loaders that transpose)."""
    shape = list(param.shape)
    dim = getattr(param, "shard_dim", None)
    if dim is not None:
        shape[dim] *= getattr(param, "tp_size", 1)
    return [tuple(shape)] + ([tuple(reversed(shape))] if len(shape) == 2 else [])


def random_init(model: nn.Module, seed: int = 0) -> LoadReport:
    """Seeded random weights made on each parameter's device, in its dtype; returns a LoadReport
    of source "random" (bytes = what was initialised).

    Matrices ~ N(0, 0.02) (an Irwin-Hall sum of four uniforms: the same std, tails cut at
    3.46 std), biases 0, other vectors 1. A value depends only on (seed, checkpoint tensor name,
    its index in the full tensor), so every (tp, pp) layout holds the same model: shards are exact
    slices of the tp=1 tensors, replicated and tied parameters equal everywhere. Each rank computes
    only its own shard, in chunks. Raises CheckpointError when a parameter's weight_loader accepts
    neither its full shape nor the transpose.
    """
    report = LoadReport("random")
    tied = getattr(model, "tied_weights", {}) or {}
    for name, param in model.named_parameters():
        source = tied.get(name, name)  # a tied head off stage 0 draws the embedding's values
        fill = "normal" if param.dim() >= 2 else 0.0 if name.endswith("bias") else 1.0
        key = _tensor_key(seed, source)
        loader = getattr(param, "weight_loader", default_weight_loader)
        errors = []
        for shape in _full_shapes(param):
            reader = RandomTensor(source, shape, param.dtype, param.device, key, fill, report)
            try:
                with torch.no_grad():
                    loader(param, reader)
                break
            except CheckpointError as e:  # a loader checks the shape before it reads
                errors.append(str(e))
        else:
            raise CheckpointError(f"random_init cannot fill {name}: {'; '.join(errors)}")
    return report
