"""`energon run --model MODEL "prompt"`: generate from a checkpoint folder or preset, streaming."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from energon.commands.options import (
    add_engine_arguments,
    add_sampling_arguments,
    engine_kwargs,
    sampling_params,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="+", help="one or more prompts (run concurrently)")
    add_engine_arguments(parser)
    add_sampling_arguments(parser, max_tokens=32)


async def _run(args: argparse.Namespace) -> int:
    from energon import Engine, InvalidRequest
    from energon.tokenizer import require_unicode

    params = sampling_params(args)
    for prompt in args.prompt:  # before the workers start, not after
        if not prompt:
            raise InvalidRequest("prompt", "must not be empty")
        require_unicode(prompt)
    async with Engine(args.model, **engine_kwargs(args)) as engine:
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
