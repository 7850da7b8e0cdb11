"""An API key on both doors, CURVE on the ZeroMQ door, `energon keygen`."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import pytest

from energon import SamplingParams
from energon.server.client import Client
from energon.server.messages import Unauthorized

GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
BODY = {"prompt": "Hello", "max_tokens": 4}


async def status_of(server, headers: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(server.http + "/v1/completions", json=BODY, headers=headers) as resp:
            return resp.status, await resp.json()


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}]
)
async def test_http_without_the_right_bearer_key_gets_401(keyed_server, headers):
    status, reply = await status_of(keyed_server, headers)
    assert status == 401 and "API key" in reply["error"]["message"]


async def test_http_with_the_key_is_served_and_refusals_are_counted(keyed_server):
    before = await keyed_server.metrics()
    await status_of(keyed_server, {})
    status, _ = await status_of(keyed_server, keyed_server.headers())
    assert status == 200
    after = await keyed_server.metrics()
    key = 'energon_requests_total{door="http",outcome="unauthorized"}'
    assert after[key] == before.get(key, 0) + 1


async def test_zmq_with_server_key_and_api_key_is_served(keyed_server):
    async with Client(
        keyed_server.zmq, api_key="s3cret", server_key=keyed_server.server_key
    ) as client:
        assert (await client.infer("Hello", GREEDY)).token_ids


async def test_zmq_with_a_wrong_api_key_is_refused(keyed_server):
    async with Client(keyed_server.zmq, api_key="nope", server_key=keyed_server.server_key) as c:
        with pytest.raises(Unauthorized, match="API key is wrong"):
            await c.infer("Hello", GREEDY)
    m = await keyed_server.metrics()
    assert m['energon_requests_total{door="zmq",outcome="unauthorized"}'] >= 1


async def test_zmq_without_curve_fails_its_handshake_and_is_told_why(keyed_server):
    async with Client(keyed_server.zmq, api_key="s3cret") as client:
        with pytest.raises(Unauthorized, match="requires CURVE"):
            await asyncio.wait_for(client.infer("Hello", GREEDY), 10)


def test_keygen_writes_a_key_pair_and_suggests_an_api_key(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "energon.cli", "keygen", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    from energon.server.keys import load_public_key, load_server_secret

    public, secret = load_server_secret(tmp_path / "k" / "server.key_secret")
    assert load_public_key(str(tmp_path / "k" / "server.key")) == public
    assert len(public) == len(secret) == 40
    assert "ENERGON_API_KEY=energon-" in out
    assert (tmp_path / "k" / "server.key_secret").stat().st_mode & 0o077 == 0
