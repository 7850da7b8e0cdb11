"""Hugging Face safetensors checkpoints → parameters, each rank reading only its own slices.

For every parameter the model keeps (after its stage was cut), the loader opens the checkpoint
tensor lazily with `safe_open(...).get_slice(name)` and hands a `TensorReader` to the parameter's
`weight_loader`, which indexes only its shard; nothing else is read from disk. Every read is
recorded in a `LoadReport`. Presets get seeded random weights instead, made on the target device.
"""

from __future__ import annotations

import json
import zlib
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


def random_init(model: nn.Module, seed: int = 0) -> LoadReport:
    """Seeded random weights on each parameter's device and dtype; returns a LoadReport of source
    "random" (bytes = what was initialised). Matrices ~ N(0, 0.02), biases 0, other vectors 1.

    Replicated parameters get the same values on every rank; shards differ by tp rank.
    """
    report = LoadReport("random")
    for name, param in model.named_parameters():
        shard = getattr(param, "tp_rank", 0) if getattr(param, "shard_dim", None) is not None else 0
        g = torch.Generator(device=param.device)
        g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) * 131 + shard)
        with torch.no_grad():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=g)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)
        report.reads.append(Read(name, "", "random", param.numel() * param.element_size()))
    return report
