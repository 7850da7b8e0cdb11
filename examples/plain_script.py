"""Energon in a plain asyncio script: one Engine, a completion, a stream, a batch.

python examples/plain_script.py [MODEL]      # MODEL: a checkpoint folder or preset (tiny)
"""

from __future__ import annotations

import asyncio
import sys

from energon import Engine, SamplingParams


async def main(model: str = "tiny") -> None:
    params = SamplingParams(max_tokens=16, temperature=0.0)
    async with Engine(model) as engine:
        done = await engine.infer("The capital of France is", params)
        print(f"infer: {done.text!r} ({done.finish_reason}, {done.usage.completion_tokens} tokens)")

        print("stream: ", end="")
        async for piece in engine.stream("Once upon a time", params):
            print(piece.text, end="", flush=True)
        print()

        prompts = [f"Prompt number {i}" for i in range(8)]
        many = await asyncio.gather(*(engine.infer(p, params) for p in prompts))  # one batch
        print(
            f"batch: {len(many)} completions, {sum(c.usage.completion_tokens for c in many)} tokens"
        )


if __name__ == "__main__":  # the guard matters: workers are spawned processes that import this
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tiny"))
