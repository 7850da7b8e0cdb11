"""`energon bench serve`: what the doors cost against calling the Engine in-process.

At each concurrency level, C streaming clients send N requests in all (fixed prompt and output
lengths, greedy, ignore_eos), first straight into an Engine in this process (the baseline), then
through `energon serve`'s HTTP door (SSE) and ZeroMQ door, each served by its own `energon serve`
process with the same model. Reported per level and door: request throughput, time to first token
and time per output token percentiles (p50/p90/p99, measured at the client), and the ratio to the
baseline. The goal: the HTTP door within 5% of in-process throughput at 256 concurrent streams.

    energon bench serve --model tiny --concurrency 1,16,64,256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from energon.bench.record import Record, write_results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concurrency", default="1,16,64,256", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=0, help="per level (0: max(64, 4*C))")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=16, help="generated tokens per request")
    parser.add_argument("--doors", default="http,zmq", help="which doors to measure")
    parser.add_argument("--repeats", type=int, default=1, help="runs per point; the best is kept")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")


@dataclass
class Run:
    """One level's measurements: wall time, and per request its TTFT and TPOT (seconds)."""

    requests: int
    seconds: float
    ttft: list[float]
    tpot: list[float]

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def pct(self, which: str, q: float) -> float:
        values = sorted(getattr(self, which))
        return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def drive(stream_one, prompts: list[str], concurrency: int) -> Run:
    """Run every prompt through `stream_one(prompt)`, an async iterator of (has_tokens,
    token_count) events, C at a time; time each request's first and last token event."""
    queue = list(reversed(prompts))
    ttft, tpot = [], []

    async def worker() -> None:
        while queue:
            prompt = queue.pop()
            start = time.perf_counter()
            first = last = None
            n = 0
            async for has_tokens, count in stream_one(prompt):
                if has_tokens:
                    last = time.perf_counter()
                    first = first or last
                n += count
            ttft.append(first - start)
            if n > 1:
                tpot.append((last - first) / (n - 1))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(len(prompts), time.perf_counter() - t0, ttft, tpot)


def engine_streamer(engine, params):
    async def stream_one(prompt: str):
        async for piece in engine.stream(prompt, params):
            yield bool(piece.token_ids), len(piece.token_ids)

    return stream_one


def http_streamer(session, url: str, body: dict):
    async def stream_one(prompt: str):
        async with session.post(url + "/v1/completions", json={**body, "prompt": prompt}) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {await r.text()}")
            async for line in r.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:  # a piece: its text may be empty (held back)
                        yield True, 0
                    else:  # the last chunk: usage (stream_options.include_usage)
                        yield False, chunk["usage"]["completion_tokens"]

    return stream_one


def zmq_streamer(client, params):
    async def stream_one(prompt: str):
        async for piece in client.stream(prompt, params):
            yield bool(piece.token_ids), len(piece.token_ids)

    return stream_one


def start_server(model: str) -> tuple[subprocess.Popen, dict[str, str]]:
    cmd = [sys.executable, "-m", "energon.cli", "serve", "--model", model]
    cmd += ["--http", "127.0.0.1:0", "--zmq", "tcp://127.0.0.1:*"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    doors = {}
    while len(doors) < 2:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("energon serve did not start")
        m = re.match(r"energon: (http|zmq) door on (\S+)", line)
        if m:
            doors[m.group(1)] = m.group(2)
    return proc, doors


async def measure(args: argparse.Namespace) -> list[Record]:
    import aiohttp

    from energon import Engine, SamplingParams
    from energon.server.client import Client

    levels = [int(c) for c in args.concurrency.split(",")]
    doors = [d for d in args.doors.split(",") if d]
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    body = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    proc, addresses = start_server(args.model)
    records = []
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            Engine(args.model) as engine,
            aiohttp.ClientSession(connector=connector) as session,
            Client(addresses["zmq"]) as client,
        ):
            streamers = {
                "engine": engine_streamer(engine, params),
                "http": http_streamer(session, addresses["http"], body),
                "zmq": zmq_streamer(client, params),
            }
            for name in ["engine", *doors]:  # warm up every path
                await drive(streamers[name], ["warm up"] * 8, 4)
            for c in levels:
                n = args.requests or max(64, 4 * c)
                prompts = [
                    "".join(rng.choice(letters) for _ in range(args.prompt_len)) for _ in range(n)
                ]
                best: dict[str, Run] = {}
                for _ in range(args.repeats):  # interleaved, so a noisy neighbour hits all
                    for name in ["engine", *doors]:
                        run = await drive(streamers[name], prompts, c)
                        if name not in best or run.throughput > best[name].throughput:
                            best[name] = run
                base = best["engine"]
                _print_level(c, best)
                records += _records(args, c, "engine", base, base)
                for name in doors:
                    records += _records(args, c, name, best[name], base)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return records


def _records(args, c: int, door: str, run: Run, base: Run) -> list[Record]:
    common = dict(
        model=args.model,
        batch=c,
        prompt_len=args.prompt_len,
        gen_len=args.max_tokens,
        baseline_name="engine in-process" if door != "engine" else None,
    )
    out = [
        Record(
            scenario=f"serve-{door}",
            metric="throughput",
            unit="req/s",
            value=run.throughput,
            baseline_value=base.throughput if door != "engine" else None,
            ratio=run.throughput / base.throughput if door != "engine" else None,
            notes=f"{run.requests} requests, {c} concurrent streams",
            **common,
        )
    ]
    for which in ("ttft", "tpot"):
        for q in (0.5, 0.9, 0.99):
            value, ref = run.pct(which, q), base.pct(which, q)
            out.append(
                Record(
                    scenario=f"serve-{door}",
                    metric=f"{which}_p{int(q * 100)}",
                    unit="s",
                    value=value,
                    baseline_value=ref if door != "engine" else None,
                    ratio=(ref / value if value else None) if door != "engine" else None,
                    **common,
                )
            )
    return out


def _print_level(c: int, runs: dict[str, Run]) -> None:
    base = runs["engine"].throughput
    for name, run in runs.items():
        print(
            f"C={c:<4} {name:<6} {run.throughput:8.1f} req/s ({run.throughput / base:5.3f}x)  "
            f"TTFT p50 {run.pct('ttft', 0.5) * 1e3:7.1f} p90 {run.pct('ttft', 0.9) * 1e3:7.1f} "
            f"p99 {run.pct('ttft', 0.99) * 1e3:7.1f} ms  "
            f"TPOT p50 {run.pct('tpot', 0.5) * 1e3:6.2f} p90 {run.pct('tpot', 0.9) * 1e3:6.2f} "
            f"p99 {run.pct('tpot', 0.99) * 1e3:6.2f} ms",
            flush=True,
        )


def main(args: argparse.Namespace) -> int:
    records = asyncio.run(measure(args))
    path = write_results("serve", records, Path(args.out) if args.out else None)
    print(json.dumps({"results": str(path), "records": len(records)}))
    return 0
