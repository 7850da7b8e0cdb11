"""Command-line options shared by the commands that start an Engine or send requests."""

from __future__ import annotations

import argparse


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--model --tp --pp --device --dtype --kv-cache-memory --kv-reserve --launcher --address
    --decode-graphs --no-lookahead --max-restarts --retry-on-failure, read back by
    `engine_kwargs`."""
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
    parser.add_argument(
        "--kv-reserve",
        type=float,
        default=0.0,
        help="share (0-1) of the KV blocks running requests would still take to reach "
        "max_tokens that is kept free when admitting more: 1 never preempts (default 0)",
    )
    parser.add_argument(
        "--launcher",
        default="local",
        choices=["local", "external", "ray"],
        help="where the workers come from (docs/multinode.md)",
    )
    parser.add_argument(
        "--address", default=None, help="tcp://HOST:PORT the controller listens on (multi-host)"
    )
    parser.add_argument(
        "--decode-graphs",
        default="auto",
        choices=["auto", "off"],
        help="CUDA graphs of decode steps (auto: on cuda)",
    )
    parser.add_argument(
        "--no-lookahead",
        dest="lookahead",
        action="store_false",
        help="send a micro-batch's next decode step only once its last one is back (default: "
        "chain them; at pp > 1 the last stage hands its tokens to the first)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        help="worker-group restarts in a row after a worker dies (0: fail for good)",
    )
    parser.add_argument(
        "--retry-on-failure",
        action="store_true",
        help="run again (once) the requests a dead worker took before any output",
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The Engine keyword arguments of `add_engine_arguments` (the model is positional)."""
    return dict(
        tp=args.tp,
        pp=args.pp,
        device=args.device,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory,
        kv_reserve=args.kv_reserve,
        launcher=args.launcher,
        address=args.address,
        decode_graphs=args.decode_graphs,
        lookahead=args.lookahead,
        max_restarts=args.max_restarts,
        retry_on_failure=args.retry_on_failure,
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
