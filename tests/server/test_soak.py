"""500 concurrent streaming clients for 30 s, half on each door: none lost, each result equal to
the same prompt's result when it ran alone."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from energon import SamplingParams
from energon.server.client import Client

CLIENTS = 500
SECONDS = 30.0
PROMPTS = [f"soak prompt {i}: " + "x" * (i % 7) for i in range(16)]
MAX_TOKENS = 6


async def http_stream(session: aiohttp.ClientSession, url: str, prompt: str) -> list[int]:
    """The streamed text's bytes (the byte tokenizer's ids) and the finish reason, via SSE."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    text, reason = [], None
    async with session.post(url + "/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["text"])
                reason = choice["finish_reason"] or reason
    return "".join(text), reason


async def zmq_stream(client: Client, prompt: str) -> tuple[str, str]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    text, reason = [], None
    async for piece in client.stream(prompt, params):
        text.append(piece.text)
        reason = piece.finish_reason
    return "".join(text), reason


async def test_500_streaming_clients_for_30_s_lose_nothing(server):
    async with Client(server.zmq) as client:  # each prompt alone first
        solo = {}
        for p in PROMPTS:
            solo[p] = await zmq_stream(client, p)
    before = await server.metrics()
    deadline = time.monotonic() + SECONDS
    done = {"http": 0, "zmq": 0}
    wrong = []

    async def http_client(n: int) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            i = n
            while time.monotonic() < deadline:
                prompt = PROMPTS[i % len(PROMPTS)]
                got = await http_stream(session, server.http, prompt)
                if got != solo[prompt]:
                    wrong.append(("http", prompt, got, solo[prompt]))
                done["http"] += 1
                i += 1

    async def zmq_client(n: int) -> None:
        async with Client(server.zmq) as client:
            i = n
            while time.monotonic() < deadline:
                prompt = PROMPTS[i % len(PROMPTS)]
                got = await zmq_stream(client, prompt)
                if got != solo[prompt]:
                    wrong.append(("zmq", prompt, got, solo[prompt]))
                done["zmq"] += 1
                i += 1

    await asyncio.wait_for(
        asyncio.gather(
            *(http_client(n) for n in range(CLIENTS // 2)),
            *(zmq_client(n) for n in range(CLIENTS - CLIENTS // 2)),
        ),
        SECONDS + 60,
    )
    assert wrong == []
    after = await server.wait_idle()
    for door in ("http", "zmq"):
        key = f'energon_requests_total{{door="{door}",outcome="ok"}}'
        assert done[door] >= CLIENTS // 2  # every client finished at least one request
        assert after[key] - before.get(key, 0) == done[door]  # none lost, none extra
    print(f"soak: {done} requests in {SECONDS:.0f} s")
