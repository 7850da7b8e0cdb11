"""What both doors share: the Engine, the limits, the API key, the metrics, and the count of
requests in flight that graceful shutdown waits on.

A door parses its wire format into (prompt, SamplingParams), then

    gen = frontend.generation(prompt, params, door="http")   # raises for a bad key/limit/draining
    async for piece in gen: ...                               # engine pieces; closing aborts
    gen.usage, gen.timings, gen.finish_reason                 # once it ended
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from energon.errors import InvalidRequest
from energon.sampling import SamplingParams, StreamPiece, Timings, Usage
from energon.server.messages import Unauthorized, Unavailable, describe_error
from energon.server.metrics import Metrics
from energon.tokenizer import require_unicode

_OUTCOME = {
    400: "invalid",
    401: "unauthorized",
    404: "invalid",
    413: "too_large",
    429: "overloaded",
    503: "unavailable",
}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Bigger requests are answered with 413 / 400 and a message."""

    max_request_bytes: int = 1 << 20  # an HTTP body or a ZeroMQ message
    max_tokens: int = 4096  # cap on SamplingParams.max_tokens
    max_prompts: int = 64  # prompts in one /v1/completions request


class Frontend:
    """Admits requests to one Engine for any number of doors. Never blocks the event loop."""

    def __init__(
        self,
        engine,
        *,
        model_name: str | None = None,
        limits: Limits | None = None,
        api_key: str | None = None,
        metrics: Metrics | None = None,
    ):
        self.engine = engine
        self.model_name = model_name or str(engine.model)
        self.limits = limits or Limits()
        self.api_key = api_key or None
        self.metrics = metrics if metrics is not None else Metrics(engine)
        self.accepting = True
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------------------ admission

    def check_key(self, presented: str | None) -> None:
        """Raises Unauthorized unless the key matches or none is required. The door counts
        every refusal with `refuse`."""
        if self.api_key is None:
            return
        if presented is None or not hmac.compare_digest(
            presented.encode("utf-8", "replace"), self.api_key.encode()
        ):
            what = "is missing" if presented is None else "is wrong"
            raise Unauthorized(f"the API key {what}: this server requires one")

    def refuse(self, door: str, exc: BaseException) -> None:
        """Count a request the door refused before it reached the Engine."""
        status = describe_error(exc)[0]
        self.metrics.count(door, _OUTCOME.get(status, "error"))

    def generation(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        door: str,
        fill_context: bool = False,
    ):
        """A Generation to iterate. Raises Unavailable while draining and InvalidRequest for a
        max_tokens over the limit or an empty prompt (not counted: the door calls `refuse`).
        The Engine's own checks (prompt length, Overloaded) raise at the first iteration.
        A prompt that is not valid Unicode (JSON may carry a lone surrogate) is an
        InvalidRequest too. `fill_context` (a chat request without max_tokens, as OpenAI
        reads it) lowers params.max_tokens to the room the prompt leaves in the context."""
        if not self.accepting:
            raise Unavailable("the server is shutting down; retry on another server")
        if params.max_tokens > self.limits.max_tokens:
            raise InvalidRequest(
                "max_tokens",
                f"must be <= {self.limits.max_tokens}, this server's limit "
                f"(got {params.max_tokens})",
            )
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt", "must not be empty")
            require_unicode(prompt)
            ids = self.engine.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequest("prompt", "encodes to no tokens")
        else:
            ids = list(prompt)
        scheduler = getattr(self.engine, "scheduler", None)  # None before the Engine runs
        if fill_context and scheduler is not None:
            room = scheduler.room(len(ids))  # below 1: the Engine refuses the prompt itself
            params = replace(params, max_tokens=max(1, min(params.max_tokens, room)))
        return Generation(self, ids, params, door)

    # ------------------------------------------------------------------------------ draining

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()
        self.metrics.in_flight.inc()

    def _leave(self) -> None:
        self._in_flight -= 1
        self.metrics.in_flight.dec()
        if self._in_flight == 0:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def drain(self, timeout: float) -> int:
        """Stop admitting, wait up to `timeout` s for requests in flight to finish. Returns how
        many are still running."""
        self.accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return self._in_flight


class Generation:
    """One admitted request. Iterate once for its pieces; `usage`, `timings` and
    `finish_reason` are filled as it runs. Closing the iteration early aborts the request."""

    def __init__(self, frontend: Frontend, ids: list[int], params: SamplingParams, door: str):
        self.frontend = frontend
        self.ids = ids
        self.params = params
        self.door = door
        self.arrived = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.queued_s = 0.0  # the Engine's measure, from the last piece
        self.cached_tokens = 0  # the Engine's count, from the last piece
        self.prompt_logprobs = None  # params.prompt_logprobs' rows, from the last piece

    @property
    def usage(self) -> Usage:
        return Usage(len(self.ids), self.completion_tokens, self.cached_tokens)

    @property
    def timings(self) -> Timings:
        first = (self.first_token - self.arrived) if self.first_token else 0.0
        per = 0.0
        if self.completion_tokens > 1:
            per = (self.last_token - self.first_token) / (self.completion_tokens - 1)
        return Timings(queued_s=self.queued_s, first_token_s=first, per_output_token_s=per)

    @property
    def abort_message(self) -> str | None:
        """Why an aborted request stopped, when the server (not the client) stopped it."""
        if self.finish_reason == "abort" and not self.frontend.accepting:
            return "the server is shutting down"
        return None

    def __aiter__(self) -> AsyncIterator[StreamPiece]:
        return self._pieces()

    async def _pieces(self) -> AsyncIterator[StreamPiece]:
        fe, metrics = self.frontend, self.frontend.metrics
        fe._enter()
        outcome = "aborted"
        stream = fe.engine.stream(self.ids, self.params)
        try:
            async for piece in stream:
                if piece.token_ids:
                    now = time.perf_counter()
                    if self.first_token is None:
                        self.first_token = now
                        metrics.time_to_first_token.observe(now - self.arrived)
                    self.last_token = now
                    self.completion_tokens += len(piece.token_ids)
                if piece.finish_reason is not None:
                    self.finish_reason = piece.finish_reason
                    if piece.timings is not None:
                        self.queued_s = piece.timings.queued_s
                    if piece.usage is not None:
                        self.cached_tokens = piece.usage.cached_tokens
                    self.prompt_logprobs = piece.prompt_logprobs
                    outcome = "ok" if piece.finish_reason != "abort" else "aborted"
                yield piece
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError | GeneratorExit):
                outcome = _OUTCOME.get(describe_error(exc)[0], "error")
            raise
        finally:
            await stream.aclose()
            fe._leave()
            metrics.count(self.door, outcome)
            if self.first_token is not None or outcome == "ok":
                metrics.prompt_tokens.inc(len(self.ids))
            metrics.generation_tokens.inc(self.completion_tokens)
            if self.completion_tokens > 1:
                metrics.time_per_output_token.observe(self.timings.per_output_token_s)
