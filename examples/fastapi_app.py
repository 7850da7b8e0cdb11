"""Energon inside a FastAPI app (on uvicorn): the Engine lives for the app's lifespan; one
endpoint answers whole, one streams text as it is generated.

    python examples/fastapi_app.py [MODEL]       # then: curl localhost:8080/stream -d '{"prompt": "Hi"}'
"""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from energon import Engine, InvalidRequest, Overloaded, SamplingParams


class GenerateRequest(BaseModel):
    prompt: str
    max_tokens: int = 16
    temperature: float = 0.0


def make_app(model: str = "tiny") -> FastAPI:
    engine = Engine(model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with engine:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.exception_handler(InvalidRequest)
    async def invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse({"error": str(exc), "field": exc.field}, status_code=400)

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=429)

    @app.post("/generate")
    async def generate(req: GenerateRequest) -> dict:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature)
        done = await engine.infer(req.prompt, params)
        return {"text": done.text, "finish_reason": done.finish_reason, "tokens": done.token_ids}

    @app.post("/stream")
    async def stream(req: GenerateRequest) -> StreamingResponse:
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature)
        pieces = engine.stream(req.prompt, params)
        first = await anext(pieces)  # bad prompts raise here, before the 200 goes out

        async def text():
            yield first.text
            async for piece in pieces:  # a client that goes away closes this: aborted
                yield piece.text

        return StreamingResponse(text(), media_type="text/plain; charset=utf-8")

    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(make_app(sys.argv[1] if len(sys.argv) > 1 else "tiny"), host="127.0.0.1", port=8080)
