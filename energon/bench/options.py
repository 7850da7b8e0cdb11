"""Command-line options shared by the GPU benchmark scenarios."""

from __future__ import annotations

import argparse


def add_model_arguments(parser: argparse.ArgumentParser, tp: str | None = "1,2") -> None:
    """--model (default opt-13b), --dtype, --device, and --tp (comma-separated sizes) unless None."""
    parser.add_argument("--model", default="opt-13b", help="preset or checkpoint (default opt-13b)")
    parser.add_argument("--dtype", default="auto", help="auto: the preset's (fp16) on cuda")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    if tp is not None:
        parser.add_argument("--tp", default=tp, help=f"comma-separated tp sizes (default {tp})")
    parser.add_argument("--matmul-size", type=int, default=0, help="0: 8192 on cuda, 512 on cpu")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without torch or CUDA)."""
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def resolve_device(choice: str, gpus: int) -> str:
    """--device: "auto" is cuda when `gpus` > 0, else cpu; "cuda" and "cpu" stay."""
    if choice != "auto":
        return choice
    return "cuda" if gpus else "cpu"


def pick_matmul_size(args, device: str) -> int:
    """--matmul-size, or its default on `device` (8192 on cuda, 512 on cpu)."""
    return args.matmul_size or (8192 if device == "cuda" else 512)
