"""Every example runs, so none can rot: the plain script as a process, the two web apps served on
loopback and asked over real sockets."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_script_runs():
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / "plain_script.py"), "tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "infer: " in out.stdout and "stream: " in out.stdout
    assert "batch: 8 completions" in out.stdout


async def test_aiohttp_app_serves_its_routes_and_energons():
    app = load("aiohttp_app").make_app("tiny")
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        url = str(server.make_url(""))
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/") as resp:
                assert await resp.text() == "my existing app\n"
            async with s.post(url + "/generate", json={"prompt": "Hi", "max_tokens": 4}) as resp:
                own = await resp.json()
            body = {"prompt": "Hi", "max_tokens": 4, "temperature": 0}
            async with s.post(url + "/v1/completions", json=body) as resp:
                oai = await resp.json()
            async with s.post(url + "/generate", json={"prompt": "", "max_tokens": 4}) as resp:
                assert resp.status == 400
    finally:
        await server.close()
    assert own["text"] == oai["choices"][0]["text"]


async def test_fastapi_app_generates_and_streams():
    import httpx
    import uvicorn

    app = load("fastapi_app").make_app("tiny")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    try:
        for _ in range(600):  # uvicorn signals no event when it is up
            if server.started or task.done():
                break
            await asyncio.sleep(0.1)
        assert server.started
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            whole = (await client.post("/generate", json={"prompt": "Hi", "max_tokens": 6})).json()
            streamed = (await client.post("/stream", json={"prompt": "Hi", "max_tokens": 6})).text
            bad = await client.post("/generate", json={"prompt": "Hi", "max_tokens": 0})
    finally:
        server.should_exit = True
        await task
    assert streamed == whole["text"]
    assert bad.status_code == 400 and bad.json()["field"] == "max_tokens"
