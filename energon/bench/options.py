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
