"""The controller host of the two-host tests: an Engine with launcher="external", run as its own
process inside host a's network namespace, driven by commands on stdin, one per line. Answers
one JSON object per line on stdout.

    python netns_controller.py MODEL ADDRESS     starts the Engine, says {"event": "ready"}
    generate    {"tokens": [[...] per prompt]}   (launch_helpers.PROMPTS, greedy)
    streams     starts two long streams, says {"event": "streaming"} once both have tokens, then,
                when they end (a worker was killed), {"event": "failed", "errors": [...], "at":
                time.monotonic(), "health": engine.health}; then shuts down and exits
EOF on stdin shuts down and exits; either way the last line is {"event": "shut down"}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from launch_helpers import PP, TP, generate_all, greedy

from energon import Engine, WorkerFailed

HEARTBEAT_TIMEOUT = 10.0


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def stream_until_failure(e: Engine, prompt: list[int], started: asyncio.Event) -> str:
    try:
        async for _ in e.stream(prompt, greedy(1000)):
            started.set()
    except WorkerFailed as exc:
        return f"WorkerFailed rank={exc.rank}: {exc.reason}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "finished"


async def streams(e: Engine) -> None:
    started = [asyncio.Event(), asyncio.Event()]
    tasks = [
        asyncio.ensure_future(stream_until_failure(e, prompt, ev))
        for prompt, ev in zip(([5, 9, 3], [42, 7]), started, strict=True)
    ]
    await asyncio.gather(*(ev.wait() for ev in started))
    say(event="streaming")  # the test kills a worker now
    errors = await asyncio.gather(*tasks)
    say(event="failed", errors=errors, at=time.monotonic(), health=e.health)


async def serve(model: str, address: str) -> None:
    e = Engine(
        model,
        tp=TP,
        pp=PP,
        device="cpu",
        launcher="external",
        address=address,
        start_timeout=60.0,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        max_restarts=0,  # a worker that dies stays dead: nothing here would restart it
        progress=False,
    )
    await e.start()
    try:
        say(event="ready")
        while command := (await asyncio.to_thread(sys.stdin.readline)).strip():
            if command == "generate":
                say(tokens=await generate_all(e))
            elif command == "streams":
                await streams(e)
                break
    finally:
        await e.shutdown()
        say(event="shut down")


if __name__ == "__main__":
    asyncio.run(serve(*sys.argv[1:3]))
