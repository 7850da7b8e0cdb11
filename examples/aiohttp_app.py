"""Energon inside an existing aiohttp app: the app keeps its own routes, runs the Engine for its
lifetime, calls it directly, and mounts Energon's OpenAI-compatible routes beside its own.

    python examples/aiohttp_app.py [MODEL]       # then: curl localhost:8080/generate -d '{"prompt": "Hi"}'
"""

from __future__ import annotations

import sys

from aiohttp import web

from energon import Engine, InvalidRequest, SamplingParams
from energon.server.frontend import Frontend
from energon.server.http_door import add_routes

ENGINE = web.AppKey("engine", Engine)


async def index(request: web.Request) -> web.Response:
    return web.Response(text="my existing app\n")


async def generate(request: web.Request) -> web.Response:
    """The app's own endpoint, calling the Engine in-process."""
    body = await request.json()
    try:
        params = SamplingParams(max_tokens=body.get("max_tokens", 16), temperature=0.0)
        done = await request.app[ENGINE].infer(body["prompt"], params)
    except InvalidRequest as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response({"text": done.text, "finish_reason": done.finish_reason})


def make_app(model: str = "tiny") -> web.Application:
    app = web.Application()
    engine = Engine(model)
    app[ENGINE] = engine

    async def run_engine(app: web.Application):
        async with engine:  # started with the app, shut down with it
            yield

    app.cleanup_ctx.append(run_engine)
    app.router.add_get("/", index)
    app.router.add_post("/generate", generate)
    add_routes(app, Frontend(engine))  # /v1/completions, /v1/chat/completions, /health, ...
    return app


if __name__ == "__main__":
    web.run_app(make_app(sys.argv[1] if len(sys.argv) > 1 else "tiny"), host="127.0.0.1", port=8080)
