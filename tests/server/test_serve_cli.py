"""`energon client` against a real server, and `energon serve`'s graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import msgpack
import pytest
import zmq
import zmq.asyncio

from energon import SamplingParams
from energon.server.client import Client
from energon.server.messages import Unavailable

from .conftest import start_server, stop_server


def client_cli(server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "energon.cli", "client", "--connect", server.zmq, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_client_cli_streams_one_prompt_to_the_terminal(server):
    async with Client(server.zmq) as client:
        ref = await client.infer("Hello", SamplingParams(max_tokens=8, temperature=0.0))
    out = client_cli(server, "--max-tokens", "8", "Hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ref.text + "\n"
    assert f"[{ref.finish_reason}]" in out.stderr


async def test_client_cli_runs_stdin_prompts_concurrently_as_json_in_order(server):
    prompts = [f"line {i}" for i in range(6)]
    out = client_cli(
        server, "--json", "--progress", "--max-tokens", "4", stdin="\n".join(prompts) + "\n"
    )
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert all(r["usage"]["completion_tokens"] == len(r["token_ids"]) for r in records)
    assert "6/6" in out.stderr  # the progress bar's last state
    async with Client(server.zmq) as client:
        ref = await client.infer("line 2", SamplingParams(max_tokens=4, temperature=0.0))
    assert records[2]["token_ids"] == ref.token_ids


def test_client_cli_reports_a_bad_argument(server):
    out = client_cli(server, "--max-tokens", "0", "Hello")
    assert out.returncode == 1 and "max_tokens" in out.stderr


async def raw_stream(address: str, max_tokens: int):
    """A raw DEALER streaming one request; returns (socket, context) after its first delta."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    params = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.0}
    await sock.send(msgpack.packb({"id": 1, "prompt": "go", "params": params, "stream": True}))
    assert msgpack.unpackb(await asyncio.wait_for(sock.recv(), 30))["type"] == "delta"
    return sock, ctx


async def last_reply(sock) -> dict:
    while True:
        msg = msgpack.unpackb(await asyncio.wait_for(sock.recv(), 60))
        if msg["type"] != "delta":
            return msg


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_lets_requests_in_flight_finish_and_refuses_new_ones(signum):
    srv = start_server()
    try:
        sock, ctx = await raw_stream(srv.zmq, max_tokens=400)
        srv.proc.send_signal(signum)
        await asyncio.sleep(0.1)  # the signal is delivered; the long request still runs
        async with Client(srv.zmq) as late:
            with pytest.raises(Unavailable, match="shutting down"):
                await asyncio.wait_for(late.infer("too late", SamplingParams(max_tokens=2)), 30)
        final = await last_reply(sock)
        assert final["type"] == "final" and final["finish_reason"] == "length"
        assert final["usage"]["completion_tokens"] == 400
        sock.close(linger=0)
        ctx.term()
    finally:
        code = stop_server(srv, signal_it=False)
    assert code == 0, "".join(srv.lines)


async def test_requests_still_running_after_the_grace_period_are_told_why():
    srv = start_server("--grace", "0.5")
    try:
        sock, ctx = await raw_stream(srv.zmq, max_tokens=2000)
        srv.proc.send_signal(signal.SIGTERM)
        final = await last_reply(sock)
        sock.close(linger=0)
        ctx.term()
    finally:
        code = stop_server(srv, signal_it=False)
    assert final["finish_reason"] == "abort"
    assert final["message"] == "the server is shutting down"
    assert code == 0, "".join(srv.lines)


async def test_client_cli_json_carries_timings_and_the_asked_logprobs(server):
    out = client_cli(server, "--json", "--logprobs", "2", "--max-tokens", "3", "--ignore-eos", "Hi")
    assert out.returncode == 0, out.stderr
    (record,) = [json.loads(line) for line in out.stdout.splitlines()]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=2)
    async with Client(server.zmq) as client:
        ref = await client.infer("Hi", params)
    assert record["token_ids"] == ref.token_ids
    assert [lp["token_id"] for lp in record["logprobs"]] == ref.token_ids
    assert [lp["top"] for lp in record["logprobs"]] == [
        [list(t) for t in r.top] for r in ref.logprobs
    ]
    assert 0 <= record["timings"]["queued_s"] <= record["timings"]["first_token_s"]
    bad = client_cli(server, "--json", "--logprobs", "99", "Hi")
    assert bad.returncode == 1 and "logprobs" in bad.stderr
