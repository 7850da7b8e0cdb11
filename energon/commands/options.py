"""Command-line options shared by the commands that start an Engine or send requests."""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--model --tp --pp --device --dtype --kv-cache-memory, read back by `engine_kwargs`."""
    parser.add_argument(
        "--model", default="tiny", help="checkpoint folder or preset (default tiny)"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument("--kv-cache-memory", default=None, help="per worker, e.g. 1GiB")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The Engine keyword arguments of `add_engine_arguments` (the model is positional)."""
    return dict(
        tp=args.tp,
        pp=args.pp,
        device=args.device,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory,
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """--max-tokens --temperature (default greedy) --top-k --top-p --seed --stop."""
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")


def sampling_params(args: argparse.Namespace):
    """SamplingParams from `add_sampling_arguments`; raises InvalidRequest naming the field."""
    from energon.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
