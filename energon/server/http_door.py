"""The HTTP door (aiohttp): OpenAI-compatible /v1/completions and /v1/chat/completions (with SSE
streaming and usage), /v1/models, /health and /metrics.

Embed it in an existing aiohttp app with `add_routes(app, frontend)`, or run it on its own with
`HttpDoor(frontend, host, port)`. A client that disconnects mid-request aborts it: its stream's
next write fails, or (standalone door) aiohttp cancels the handler; either closes the Engine
stream, which frees the request's KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from aiohttp import web

from energon.errors import EnergonError, InvalidRequest
from energon.sampling import StreamPiece, TokenLogprob, Usage
from energon.server.frontend import Frontend, Generation
from energon.server.messages import NotFound, ServerError, TooLarge, describe_error
from energon.server.openai_logprobs import LogprobsRenderer, joined
from energon.server.openai_schema import (
    DeltaTemplate,
    OpenAIRequest,
    chunk,
    error_body,
    new_id,
    parse_chat,
    parse_completion,
    response,
)

DOOR = "http"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"


@dataclass
class Echo:
    """What a completions choice with `echo` starts with: its prompt's text and token ids, and
    (with logprobs) each prompt token's after the first."""

    text: str
    ids: list[int]
    logprobs: list[TokenLogprob] | None


def _dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def error_response(exc: BaseException) -> web.Response:
    """The OpenAI error object for `exc`, with its status code."""
    status, kind, field, message = describe_error(exc)
    return web.Response(
        status=status,
        body=_dumps(error_body(status, kind, field, message)),
        content_type="application/json",
    )


async def read_json(request: web.Request, limit: int) -> dict:
    """The request body as a JSON object. Raises TooLarge over `limit` bytes, InvalidRequest for
    bad JSON or a non-object."""
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"request body is {request.content_length} bytes; the limit is {limit}")
    body = bytearray()
    async for part in request.content.iter_any():
        body += part
        if len(body) > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes")
    try:
        value = json.loads(body)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequest("body", f"is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest("body", f"must be a JSON object (got {type(value).__name__})")
    return value


class OpenAIHandlers:
    """Request handlers bound to one Frontend."""

    def __init__(self, frontend: Frontend):
        self.fe = frontend
        self.created = int(time.time())

    def authorize(self, request: web.Request) -> None:
        """Raises Unauthorized unless the bearer token is the API key (when one is set)."""
        if self.fe.api_key is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        self.fe.check_key(token.strip() if scheme.lower() == "bearer" and token else None)

    def refusal(self, request: web.Request) -> web.Response | None:
        """The error response (counted as refused) when the request lacks the key, else None."""
        try:
            self.authorize(request)
        except ServerError as exc:
            self.fe.refuse(DOOR, exc)
            return error_response(exc)
        return None

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def models(self, request: web.Request) -> web.Response:
        if (refused := self.refusal(request)) is not None:
            return refused
        engine = self.fe.engine
        card = {
            "id": self.fe.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "energon",
        }
        if getattr(engine, "scheduler", None) is not None and engine.scheduler.max_model_len:
            card["max_model_len"] = engine.scheduler.max_model_len
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        """200 {"status": "ok"} while serving; 503 with "failed" (the Engine gave up),
        "draining" (shutting down), "degraded" (restarting failed workers: requests queue
        meanwhile) or "stopped", and the reason."""
        report = self.fe.engine.health_report()
        if report["status"] == "failed":
            return web.json_response(report, status=503)
        if not self.fe.accepting:
            return web.json_response({**report, "status": "draining"}, status=503)
        if report["status"] != "ok":
            return web.json_response(report, status=503)
        return web.json_response({**report, "model": self.fe.model_name})

    async def metrics(self, request: web.Request) -> web.Response:
        if (refused := self.refusal(request)) is not None:
            return refused
        body, content_type = self.fe.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # ------------------------------------------------------------------------------ generation

    def _renderer(self, parsed: OpenAIRequest) -> LogprobsRenderer | None:
        """A choice's logprobs renderer, or None when the request asked for none."""
        if parsed.top_logprobs is None:
            return None
        return LogprobsRenderer(self.fe.engine.tokenizer, parsed.top_logprobs, parsed.chat)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        fe = self.fe
        try:
            self.authorize(request)
            body = await read_json(request, fe.limits.max_request_bytes)
            if chat:
                parsed = parse_chat(body, fe.limits, fe.model_name, fe.engine.tokenizer)
            else:
                parsed = parse_completion(body, fe.limits, fe.model_name)
            prompts = [p for p in parsed.prompts for _ in range(parsed.n)]
            gens = [
                fe.generation(p, params, DOOR, parsed.fill_context)
                for p, params in zip(prompts, parsed.choice_params(), strict=True)
            ]
            echoes = await self._echoes(parsed, gens) if parsed.echo else None
        except (ServerError, InvalidRequest) as exc:
            fe.refuse(DOOR, exc)
            return error_response(exc)
        req_id = new_id(chat)
        if parsed.stream:
            return await self._stream(request, req_id, parsed, gens, echoes)
        try:
            results = await _gather_all(
                _collect(g, self._renderer(parsed), echoes[i] if echoes else None)
                for i, g in enumerate(gens)
            )
        except EnergonError as exc:
            return error_response(exc)
        return web.json_response(
            response(req_id, fe.model_name, chat, results, _usage(gens, parsed.n)),
            dumps=_json_str,
        )

    async def _echoes(self, parsed: OpenAIRequest, gens: list[Generation]) -> list[Echo]:
        """Each choice's echo; the prompt logprobs come from one pass over the prompts."""
        firsts = gens[:: parsed.n]
        rows: list = [None] * len(firsts)
        if parsed.top_logprobs is not None:
            top = parsed.top_logprobs
            try:
                rows = await self.fe.engine.prompt_logprobs([g.ids for g in firsts], top)
            except InvalidRequest as exc:  # its token_lists are this request's prompts
                raise InvalidRequest("prompt", exc.problem) from None
        decode = self.fe.engine.tokenizer.decode
        echoes = [
            Echo(p if isinstance(p, str) else decode(g.ids), g.ids, r)
            for p, g, r in zip(parsed.prompts, firsts, rows, strict=True)
        ]
        return [e for e in echoes for _ in range(parsed.n)]

    async def _stream(
        self,
        request: web.Request,
        req_id: str,
        parsed: OpenAIRequest,
        gens: list[Generation],
        echoes: list[Echo] | None,
    ) -> web.StreamResponse:
        model, chat = self.fe.model_name, parsed.chat
        streams = [g.__aiter__() for g in gens]
        try:
            try:
                # The Engine checks a prompt (length, Overloaded) at its first step: answer
                # those with a proper status before the 200 of the stream goes out.
                firsts = await _gather_all(s.__anext__() for s in streams)
            except EnergonError as exc:
                return error_response(exc)
            resp = web.StreamResponse(headers=SSE_HEADERS)
            await resp.prepare(request)
            await self._write_chunks(resp, req_id, parsed, streams, firsts, echoes)
            if parsed.include_usage:
                usage = _usage(gens, parsed.n)
                await resp.write(_event(chunk(req_id, model, chat, None, usage=usage)))
            await resp.write(DONE)
            return resp
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away: closing the streams below aborts the requests
        except EnergonError as exc:  # e.g. a worker failed mid-stream: say so, then end
            status, kind, field, message = describe_error(exc)
            await resp.write(_event(error_body(status, kind, field, message)))
            await resp.write(DONE)
            return resp
        finally:
            for s in streams:
                await s.aclose()

    async def _write_chunks(
        self, resp, req_id: str, parsed: OpenAIRequest, streams, firsts, echoes
    ) -> None:
        """Every choice's chunks, each choice's in order, the choices interleaved as they come;
        with echo, a choice's first chunk holds its prompt."""
        model, chat = self.fe.model_name, parsed.chat
        renderers = [self._renderer(parsed) for _ in streams]
        middles = [DeltaTemplate(req_id, model, chat, i) for i in range(len(streams))]
        async with aclosing(_merge(streams, firsts)) as pieces:
            async for i, piece, first in pieces:
                renderer = renderers[i]
                if first and echoes:
                    echo = echoes[i]
                    head = renderer.render_prompt(echo.ids, echo.logprobs) if renderer else None
                    data = chunk(req_id, model, chat, echo.text, logprobs=head, index=i)
                    await resp.write(_event(data))
                # The first and last chunks, and (with logprobs) every one that brings tokens,
                # are rendered whole; the middle ones from the template.
                if first or piece.finish_reason is not None or (renderer and piece.token_ids):
                    logprobs = renderer.render(piece.logprobs) if renderer else None
                    data = chunk(
                        req_id, model, chat, piece.text, piece.finish_reason,
                        first=first, logprobs=logprobs, index=i,
                    )  # fmt: skip
                    await resp.write(_event(data))
                elif piece.text:
                    await resp.write(middles[i].render(piece.text))


async def _merge(streams, firsts) -> AsyncIterator[tuple[int, StreamPiece, bool]]:
    """(choice index, piece, is its first) from every stream, given each one's first piece, until
    each has its finish_reason. One stream is read directly; several through a task each."""
    for i, piece in enumerate(firsts):
        yield i, piece, True
    live = {i for i, piece in enumerate(firsts) if piece.finish_reason is None}
    if len(streams) == 1:
        if live:
            async for piece in streams[0]:
                yield 0, piece, False
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for piece in streams[i]:
                queue.put_nowait((i, piece))
        except Exception as exc:  # the writer raises it
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i)) for i in sorted(live)]
    try:
        while live:
            i, piece = await queue.get()
            if isinstance(piece, Exception):
                raise piece
            if piece.finish_reason is not None:
                live.discard(i)
            yield i, piece, False
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(gens: list[Generation], n: int) -> Usage:
    """The request's usage, as OpenAI counts it: each prompt once, every choice's tokens."""
    return Usage(
        sum(g.usage.prompt_tokens for g in gens[::n]),
        sum(g.usage.completion_tokens for g in gens),
        sum(g.usage.cached_tokens for g in gens[::n]),
    )


def _event(obj) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + _dumps(obj) + b"\n\n"


def _json_str(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


async def _collect(
    gen: Generation, renderer: LogprobsRenderer | None, echo: Echo | None
) -> tuple[str, str, dict | None]:
    parts, logprobs = [], []
    async for piece in gen:
        parts.append(piece.text)
        logprobs.extend(piece.logprobs or ())
    text = "".join(parts)
    head = renderer.render_prompt(echo.ids, echo.logprobs) if echo and renderer else None
    rendered = renderer.render(logprobs) if renderer else None
    if echo:
        text = echo.text + text
        rendered = joined(head, rendered) if head else rendered
    return text, gen.finish_reason or "abort", rendered


async def _gather_all(coros) -> list:
    """Like asyncio.gather, but the first failure cancels the others."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def add_routes(app: web.Application, frontend: Frontend, prefix: str = "") -> OpenAIHandlers:
    """Mount the OpenAI routes, /health and /metrics on an existing aiohttp app."""
    h = OpenAIHandlers(frontend)
    app.router.add_post(prefix + "/v1/completions", h.completions)
    app.router.add_post(prefix + "/v1/chat/completions", h.chat_completions)
    app.router.add_get(prefix + "/v1/models", h.models)
    app.router.add_get(prefix + "/health", h.health)
    app.router.add_get(prefix + "/metrics", h.metrics)
    return h


@web.middleware
async def json_errors(request: web.Request, handler):
    """aiohttp's own 404 / 405 / 413 as OpenAI error objects."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = NotFound(exc.reason) if exc.status == 404 else ServerError(exc.reason)
        err.status, err.kind = exc.status, exc.reason.lower().replace(" ", "_")
        return error_response(err)


def make_app(frontend: Frontend) -> web.Application:
    """A standalone aiohttp app serving `frontend`."""
    app = web.Application(
        client_max_size=frontend.limits.max_request_bytes, middlewares=[json_errors]
    )
    add_routes(app, frontend)
    return app


class HttpDoor:
    """The HTTP door on host:port (port 0 picks a free one). `start()` returns the URL."""

    def __init__(self, frontend: Frontend, host: str = "127.0.0.1", port: int = 8000):
        self.frontend = frontend
        self.host, self.port = host, port
        # handler_cancellation: a client that disconnects cancels its handler (and request).
        self.runner = web.AppRunner(
            make_app(frontend), handler_cancellation=True, access_log=None, shutdown_timeout=2.0
        )
        self.url: str | None = None

    async def start(self) -> str:
        """Listen; returns 'http://host:port'. Raises OSError if the address is taken."""
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, backlog=1024)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        return self.url

    async def close(self) -> None:
        """Stop listening and close connections (after the Frontend drained its requests)."""
        await self.runner.cleanup()
