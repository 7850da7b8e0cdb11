"""Servers for the server tests: real `energon serve` processes with the tiny preset on loopback.

`server` is shared by the module's tests (one Engine start, a few seconds); `keyed_server`
requires an API key on both doors and CURVE on the ZeroMQ door. Tests talk to them over real
sockets only.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

START_TIMEOUT = 60.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    http: str  # http://127.0.0.1:PORT
    zmq: str  # tcp://127.0.0.1:PORT
    api_key: str | None = None
    server_key: str | None = None  # path of server.key (CURVE public)
    lines: list[str] = field(default_factory=list)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def metrics(self) -> dict[str, float]:
        """Every sample of /metrics as {'name{label="v",...}': value}."""
        async with aiohttp.ClientSession() as session:
            async with session.get(self.http + "/metrics", headers=self.headers()) as resp:
                assert resp.status == 200, await resp.text()
                text = await resp.text()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    async def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Waits (polling /metrics: the server is another process) until no request holds a KV
        block or is in flight; returns the last metrics. Fails the test on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            m = await self.metrics()
            if m["energon_kv_blocks_used"] == 0 and m["energon_requests_in_flight"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server still busy after {timeout} s: {m}")
            await asyncio.sleep(0.05)


def start_server(*extra: str, env: dict | None = None) -> ServerProcess:
    """Runs `energon serve --model tiny` on free loopback ports and waits until both doors
    listen. Raises RuntimeError with its output if it does not come up."""
    cmd = [
        sys.executable,
        "-m",
        "energon.cli",
        "serve",
        "--model",
        "tiny",
        "--http",
        "127.0.0.1:0",
        "--zmq",
        "tcp://127.0.0.1:*",
        "--loop",
        "asyncio",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    lines, doors = [], {}
    deadline = time.monotonic() + START_TIMEOUT
    while len(doors) < 2:
        line = proc.stdout.readline()
        if not line or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("energon serve did not start:\n" + "".join(lines))
        lines.append(line)
        m = re.match(r"energon: (http|zmq) door on (\S+)", line)
        if m:
            doors[m.group(1)] = m.group(2)
    return ServerProcess(proc, doors["http"], doors["zmq"], lines=lines)


def stop_server(server: ServerProcess, timeout: float = 30.0, signal_it: bool = True) -> int:
    """SIGTERM (unless the test signalled it already), then wait; returns the exit code (kills
    it after `timeout`)."""
    if signal_it and server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        out, _ = server.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        out, _ = server.proc.communicate()
    server.lines.append(out or "")
    return server.proc.returncode


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    yield srv
    assert stop_server(srv) == 0, "".join(srv.lines)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    from energon.server.keys import generate_curve_keys

    public, secret = generate_curve_keys(tmp_path_factory.mktemp("keys"))
    srv = start_server("--curve-secret-key", str(secret), env={"ENERGON_API_KEY": "s3cret"})
    srv.api_key, srv.server_key = "s3cret", str(public)
    yield srv
    assert stop_server(srv) == 0, "".join(srv.lines)
