"""Test actors for the pool: a PoolMember that can write and read its regions, and a model
checkpoint maker (a deeper `tiny`, so that a pipeline stage has layers enough to pool)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from energon.actors import actor_context
from energon.pool.member import PoolMember
from energon.pool.messages import SHM_PREFIX


class PoolActor(PoolMember):
    """A worker that lends and borrows; `device` "cpu" or "cuda" (→ cuda:rank)."""

    def __init__(self, device: str = "cpu"):
        rank = actor_context().rank
        self.device = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)  # the CUDA context exists before any measuring

    def pid(self) -> int:
        return os.getpid()

    def write(self, lease: int, offset: int, data: bytes) -> None:
        region = self.pool_buffer(lease)
        src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        region[offset : offset + len(data)].copy_(src)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def read(self, lease: int, offset: int, n: int) -> bytes:
        region = self.pool_buffer(lease)
        return bytes(region[offset : offset + n].cpu().numpy().tobytes())

    def device_free(self) -> int:
        """This worker's GPU's free bytes (the device counter)."""
        return torch.cuda.mem_get_info(self.device)[0]


def mapped_segments(pid: int) -> list[str]:
    """Lines of /proc/pid/maps that map a pool segment (deleted or not)."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return [line for line in f if SHM_PREFIX in line]
    except FileNotFoundError:
        return []


def shm_names() -> list[str]:
    """Pool segment names present in /dev/shm."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX))


def make_checkpoint(folder: Path, layers: int = 8, seed: int = 0) -> Path:
    """The `tiny` preset with `layers` decoder layers, seeded random weights, saved as a
    safetensors checkpoint (config.json + model.safetensors) in folder."""
    from safetensors.torch import save_file

    from energon.models.loader import random_init
    from energon.models.registry import PRESETS, resolve

    config = dict(PRESETS["tiny"], num_hidden_layers=layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    spec = resolve(folder)
    model = spec.model_class(spec.config)
    random_init(model, seed)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
