"""`energon run --model MODEL "prompt"`: generate from a checkpoint folder or preset, streaming."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="+", help="one or more prompts (run concurrently)")
    parser.add_argument(
        "--model", default="tiny", help="checkpoint folder or preset (default tiny)"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"]
    )
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kv-cache-memory", default=None, help="per worker, e.g. 1GiB")


async def _run(args: argparse.Namespace) -> int:
    from energon import Engine, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    async with Engine(
        args.model,
        tp=args.tp,
        pp=args.pp,
        device=args.device,
        dtype=args.dtype,
        kv_cache_memory=args.kv_cache_memory,
    ) as engine:
        if len(args.prompt) == 1:
            async for piece in engine.stream(args.prompt[0], params):
                sys.stdout.write(piece.text)
                sys.stdout.flush()
                if piece.finish_reason:
                    sys.stdout.write(f"\n[{piece.finish_reason}]\n")
            return 0
        done = await asyncio.gather(*(engine.infer(p, params) for p in args.prompt))
        for prompt, c in zip(args.prompt, done, strict=True):
            print(
                f"{prompt!r} -> {c.text!r} [{c.finish_reason}, {c.usage.completion_tokens} tokens,"
                f" first token {c.timings.first_token_s * 1e3:.0f} ms]"
            )
    return 0


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from energon.errors import EnergonError

    try:
        return asyncio.run(_run(args))
    except EnergonError as exc:
        print(f"energon: {exc}", file=sys.stderr)
        return 2
