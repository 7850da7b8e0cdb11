"""`energon client --connect tcp://HOST:PORT "prompt"`: talk to `energon serve --zmq ...`.

One prompt streams its text to the terminal. Several prompts (arguments, or stdin one per line
when none is given) run concurrently with a progress bar on stderr, and print one line each, in
input order. --json prints one JSON object per prompt instead, for machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, replace

from energon.commands.options import add_sampling_arguments, sampling_params
from energon.server.keys import API_KEY_ENV, SERVER_KEY_ENV, resolve_api_key


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="*", help="prompts; none: read stdin, one per line")
    parser.add_argument(
        "--connect", default="tcp://127.0.0.1:5555", help="the server's ZeroMQ door"
    )
    parser.add_argument("--api-key", default=None, help=f"the server's API key (or ${API_KEY_ENV})")
    parser.add_argument(
        "--server-key",
        default=None,
        help=f"the server's CURVE public key: server.key or its Z85 text (or ${SERVER_KEY_ENV})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per prompt (text, token ids, usage, timings, logprobs)",
    )
    parser.add_argument(
        "--logprobs",
        type=int,
        default=0,
        help="with --json: each token's logprob and the K most likely tokens' (default 0: none)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="requests at once")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal and prompts > 1)",
    )
    add_sampling_arguments(parser, max_tokens=64)


class ProgressBar:
    """`[#####.....] done/total rate` redrawn in place on a stream."""

    def __init__(self, total: int, stream=sys.stderr, width: int = 30):
        self.total, self.stream, self.width = total, stream, width
        self.done = self.failed = 0
        self.start = time.perf_counter()

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        filled = self.width * self.done // max(self.total, 1)
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        failed = f", {self.failed} failed" if self.failed else ""
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{rate:.1f} req/s{failed}"
        )
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def _record(index: int, prompt: str, done=None, error: BaseException | None = None) -> dict:
    out = {"index": index, "prompt": prompt}
    if error is not None:
        out["error"] = {"type": type(error).__name__, "message": str(error)}
        return out
    out.update(
        text=done.text,
        token_ids=done.token_ids,
        finish_reason=done.finish_reason,
        usage=asdict(done.usage),
        timings=asdict(done.timings) if done.timings else None,
    )
    if done.logprobs is not None:
        out["logprobs"] = [asdict(lp) for lp in done.logprobs]
    return out


async def _stream_one(client, prompt: str, params) -> int:
    async for piece in client.stream(prompt, params):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        if piece.finish_reason:
            sys.stdout.write("\n")
            print(f"[{piece.finish_reason}]", file=sys.stderr)
    return 0


async def _run_many(client, prompts: list[str], params, args) -> int:
    limit = asyncio.Semaphore(max(1, args.concurrency))
    show = (
        args.progress if args.progress is not None else (sys.stderr.isatty() and len(prompts) > 1)
    )
    bar = ProgressBar(len(prompts)) if show else None
    results: list[dict | None] = [None] * len(prompts)
    ready = asyncio.Event()
    printed = 0

    async def one(i: int, prompt: str) -> None:
        async with limit:
            try:
                results[i] = _record(i, prompt, done=await client.infer(prompt, params))
            except Exception as exc:  # report per prompt; the others go on
                results[i] = _record(i, prompt, error=exc)
        if bar:
            bar.update("error" not in results[i])
        ready.set()

    tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
    while printed < len(prompts):  # print in input order as soon as each is ready
        await ready.wait()
        ready.clear()
        while printed < len(prompts) and results[printed] is not None:
            _print(results[printed], args.json)
            printed += 1
    await asyncio.gather(*tasks)
    return 1 if any("error" in r for r in results) else 0


def _print(record: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(record, ensure_ascii=False), flush=True)
    elif "error" in record:
        print(
            f"energon client: prompt {record['index']}: {record['error']['message']}",
            file=sys.stderr,
        )
        print("", flush=True)
    else:  # one line per prompt: newlines in the text are escaped
        print(record["text"].replace("\\", "\\\\").replace("\n", "\\n"), flush=True)


async def _run(args: argparse.Namespace, prompts: list[str]) -> int:
    from energon.server.client import Client

    params = replace(sampling_params(args), logprobs=args.logprobs)
    server_key = args.server_key or os.environ.get(SERVER_KEY_ENV) or None
    async with Client(
        args.connect, api_key=resolve_api_key(args.api_key), server_key=server_key
    ) as client:
        if len(prompts) == 1 and not args.json:
            return await _stream_one(client, prompts[0], params)
        return await _run_many(client, prompts, params, args)


def main(args: argparse.Namespace) -> int:
    from energon.errors import EnergonError

    prompts = list(args.prompt)
    if not prompts:
        if sys.stdin.isatty():
            print("energon client: give a prompt, or pipe prompts on stdin", file=sys.stderr)
            return 2
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not prompts:
            print("energon client: stdin held no prompts", file=sys.stderr)
            return 2
    try:
        return asyncio.run(_run(args, prompts))
    except (EnergonError, ValueError) as exc:
        print(f"energon client: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
