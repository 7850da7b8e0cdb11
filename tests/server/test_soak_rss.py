"""Soak: many requests through the HTTP door of an Engine (tiny, tp=2: two worker processes)
served from this process. Nothing is lost or hung, every answer equals what the Engine gives
for the same prompt on its own, memory stays flat (the controller's and each worker's resident
set within 10% from the end of warm-up to the end), and every KV block is free again at the end.

The requests cycle through the door's kinds: completions and chat, whole and streamed, several
prompts in one request, streams the client drops after the first chunk (which must free their
blocks), and malformed requests (which must get a 400).

The short version runs in CI; ENERGON_LONG=1 runs 20,000 requests (the figures of
docs/reliability.md). ENERGON_SOAK_REPORT=path also writes the figures there as JSON.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import multiprocessing
import os
import time
from pathlib import Path

import aiohttp
import pytest

from energon import Engine, SamplingParams
from energon.server.chat import render_chat
from energon.server.frontend import Frontend
from energon.server.http_door import HttpDoor

LONG = os.environ.get("ENERGON_LONG") == "1"
REQUESTS = 20_000 if LONG else 1_000
WARMUP = REQUESTS // 10
CONCURRENCY = 32
TP = 2  # two workers, whose steps meet in an all-reduce
HUNG_AFTER = 60.0  # seconds without an answer: the request is hung
RSS_TOLERANCE = 0.10
PROMPTS = [f"soak {i}: " + "ab" * (i % 5) for i in range(8)]
MAX_TOKENS = (1, 3, 6)
KINDS = ["completion", "stream", "chat", "chat stream", "two prompts", "completion", "stream"]
pytestmark = pytest.mark.timeout(3600 if LONG else 300)


def rss_kib(pid: int | str = "self") -> int:
    """VmRSS of a process, in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def worker_pids() -> list[int]:
    return sorted(
        p.pid for p in multiprocessing.active_children() if p.name.startswith("energon-worker")
    )


def memory() -> dict[str, int]:
    gc.collect()
    return {"controller": rss_kib(), **{f"worker {pid}": rss_kib(pid) for pid in worker_pids()}}


class Soak:
    """Sends request i of the cycle and records what became of it."""

    def __init__(self, url: str, session: aiohttp.ClientSession, reference: dict):
        self.url = url
        self.session = session
        self.reference = reference  # (chat, prompt, max_tokens) -> the Engine's own text
        self.outcomes = dict.fromkeys(("ok", "wrong", "lost", "hung", "dropped", "refused"), 0)
        self.problems: list[str] = []

    def request(self, i: int) -> tuple[str, dict, list]:
        """(route, body, expected texts) of request i; None texts: a 400 is expected."""
        prompt, max_tokens = PROMPTS[i % len(PROMPTS)], MAX_TOKENS[i % len(MAX_TOKENS)]
        kind = KINDS[i % len(KINDS)]
        body = {"max_tokens": max_tokens, "temperature": 0, "stream": "stream" in kind}
        if i % 50 == 49:
            return "/v1/completions", {**body, "prompt": prompt, "max_tokens": 0}, None
        if kind.startswith("chat"):
            body["messages"] = [{"role": "user", "content": prompt}]
            return "/v1/chat/completions", body, [self.reference[True, prompt, max_tokens]]
        prompts = [prompt, PROMPTS[(i + 1) % len(PROMPTS)]] if kind == "two prompts" else [prompt]
        body["prompt"] = prompts if len(prompts) > 1 else prompt
        return "/v1/completions", body, [self.reference[False, p, max_tokens] for p in prompts]

    async def run(self, i: int) -> None:
        try:
            outcome = await asyncio.wait_for(self._send(i), HUNG_AFTER)
        except asyncio.TimeoutError:
            outcome = "hung"
        except (aiohttp.ClientError, ValueError, KeyError) as exc:
            outcome = "lost"
            self.problems.append(f"request {i}: {type(exc).__name__}: {exc}")
        self.outcomes[outcome] += 1

    async def _send(self, i: int) -> str:
        route, body, expected = self.request(i)
        drop = body["stream"] and i % 25 == 0  # the client goes away after the first chunk
        async with self.session.post(self.url + route, json=body) as resp:
            if expected is None:
                return "refused" if resp.status == 400 else self._problem(i, resp.status)
            if resp.status != 200:
                return self._problem(i, resp.status, await resp.text())
            if not body["stream"]:
                choices = (await resp.json())["choices"]
                texts = [c["message"]["content"] if "message" in c else c["text"] for c in choices]
            else:
                texts = [await self._stream_text(resp, drop)]
                if drop:
                    return "dropped"
        return "ok" if texts == expected else self._problem(i, "wrong", texts, expected)

    @staticmethod
    async def _stream_text(resp: aiohttp.ClientResponse, drop: bool) -> str:
        parts, done = [], False
        async for line in resp.content:
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: "):
                choice = json.loads(line[6:])["choices"][0]
                delta = choice.get("delta")  # chat chunks carry a delta, completions a text
                parts.append(delta.get("content", "") if delta is not None else choice["text"])
                if drop:
                    resp.close()
                    return ""
        if not done:
            raise ValueError("the stream ended without [DONE]")
        return "".join(parts)

    def _problem(self, i: int, *what) -> str:
        self.problems.append(f"request {i}: {what}")
        return "wrong" if what[0] == "wrong" else "lost"


async def run_requests(soak: Soak, indices: range) -> None:
    """CONCURRENCY clients, each sending the next request of `indices` when its last is done."""
    todo = iter(indices)

    async def client() -> None:
        for i in todo:
            await soak.run(i)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


async def test_soak_loses_nothing_keeps_memory_flat_and_frees_every_kv_block():
    engine = await Engine("tiny", tp=TP, device="cpu", progress=False).start()
    frontend = Frontend(engine)
    door = HttpDoor(frontend, "127.0.0.1", 0)
    try:
        url = await door.start()
        reference = {}
        for prompt, n in itertools.product(PROMPTS, MAX_TOKENS):  # each alone
            params = SamplingParams(max_tokens=n, temperature=0.0)
            chat = render_chat(engine.tokenizer, [{"role": "user", "content": prompt}])
            reference[False, prompt, n] = (await engine.infer(prompt, params)).text
            reference[True, prompt, n] = (await engine.infer(chat, params)).text
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as session:
            soak = Soak(url, session, reference)
            t0 = time.monotonic()
            await run_requests(soak, range(WARMUP))
            warm = memory()
            t1 = time.monotonic()
            await run_requests(soak, range(WARMUP, REQUESTS))
            seconds = time.monotonic() - t0
            # dropped streams end on the server a moment after the client hung up
            still_running = await frontend.drain(HUNG_AFTER)
            end = memory()
        blocks = engine.scheduler.blocks
        figures = {
            "requests": REQUESTS,
            "warmup_requests": WARMUP,
            "completed": soak.outcomes["ok"] + soak.outcomes["refused"],
            **soak.outcomes,
            "seconds": round(seconds, 1),
            "requests_per_second_after_warmup": round(
                (REQUESTS - WARMUP) / (time.monotonic() - t1), 1
            ),  # fmt: skip
            "rss_kib_after_warmup": warm,
            "rss_kib_at_end": end,
            "kv_blocks_free_at_end": blocks.num_free_blocks,
            "kv_blocks_total": blocks.num_blocks,
            "requests_left_in_engine": engine.stats()["requests"],
            "requests_left_in_door": still_running,
        }
    finally:
        await door.close()
        await engine.shutdown()
    print("soak:", json.dumps(figures))
    if os.environ.get("ENERGON_SOAK_REPORT"):
        report = Path(os.environ["ENERGON_SOAK_REPORT"])
        await asyncio.to_thread(report.write_text, json.dumps(figures, indent=1))

    assert soak.problems == []
    assert soak.outcomes["lost"] == soak.outcomes["hung"] == soak.outcomes["wrong"] == 0
    assert sum(soak.outcomes.values()) == REQUESTS
    assert soak.outcomes["dropped"] > 0 and soak.outcomes["refused"] == REQUESTS // 50
    assert warm.keys() == end.keys() and len(warm) == 1 + TP  # the controller and each worker
    for who, kib in end.items():
        assert abs(kib - warm[who]) <= RSS_TOLERANCE * warm[who], (who, warm[who], kib)
    assert figures["kv_blocks_free_at_end"] == figures["kv_blocks_total"]
    assert figures["requests_left_in_engine"] == figures["requests_left_in_door"] == 0
