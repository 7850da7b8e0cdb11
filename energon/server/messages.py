"""The ZeroMQ door's messages, in one place: what a client sends, what the server answers, and the
errors both doors report.

A client is a DEALER; the server is a ROUTER. Every message is one msgpack frame holding a map:

    client -> server
      {"v": 1, "type": "generate", "id": 7, "prompt": "Hello" | "token_ids": [72, 105],
       "params": {"max_tokens": 16, "temperature": 0.0, ...}, "stream": true, "key": "..."}
      {"v": 1, "type": "abort", "id": 7}

    server -> client (for each request: zero or more deltas, then exactly one final or error)
      {"v": 1, "type": "delta", "id": 7, "text": "...", "token_ids": [...]}
      {"v": 1, "type": "final", "id": 7, "text": "...", "token_ids": [...],
       "finish_reason": "stop" | "length" | "abort", "usage": {...}, "timings": {...},
       "message": null | "why it was aborted"}
      (with params.logprobs = k, deltas and the final also carry "logprobs": one
       {"token_id", "logprob", "top_ids", "top_logprobs"} per id of their "token_ids"; with
       params.prompt_logprobs = k the final carries "prompt_logprobs": null for the prompt's
       first token, then one such row per later prompt token)
      {"v": 1, "type": "error", "id": 7 | null, "status": 400, "kind": "invalid_request",
       "field": "max_tokens" | null, "message": "max_tokens must be an int >= 1 (got 0)"}

`id` (an int or a short string) is the client's: unique among its requests in flight, echoed on
every reply, so replies may come in any order. A final message carries the text and token ids not
yet sent in deltas (all of them when `stream` is false). `params` are `SamplingParams` fields;
`logit_bias` travels as [[token id, bias], ...] pairs (a msgpack map here must have string keys).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from energon.errors import EnergonError, InvalidRequest, Overloaded, WorkerFailed
from energon.sampling import (
    Completion,
    SamplingParams,
    StreamPiece,
    Timings,
    TokenLogprob,
    Usage,
)

VERSION = 1
MAX_ID_CHARS = 64


class ServerError(EnergonError):
    """The server refused or failed a request. `status` is an HTTP status code (both doors use
    them), `kind` a short machine name, `field` the offending request field or None."""

    status = 500
    kind = "internal_error"

    def __init__(self, message: str, field: str | None = None):
        self.message = message
        self.field = field
        super().__init__(message)


class Unauthorized(ServerError):
    """The API key is missing or wrong."""

    status, kind = 401, "unauthorized"


class TooLarge(ServerError):
    """The request body or message is over the server's size limit."""

    status, kind = 413, "too_large"


class NotFound(ServerError):
    """An unknown model or route."""

    status, kind = 404, "not_found"


class Unavailable(ServerError):
    """The server is shutting down or its workers failed; retry elsewhere or later."""

    status, kind = 503, "unavailable"


def describe_error(exc: BaseException) -> tuple[int, str, str | None, str]:
    """(status, kind, field, message) for any exception a request may end with."""
    if isinstance(exc, ServerError):
        return exc.status, exc.kind, exc.field, exc.message
    if isinstance(exc, InvalidRequest):
        return 400, "invalid_request", exc.field, str(exc)
    if isinstance(exc, Overloaded):
        return 429, "overloaded", None, str(exc)
    if isinstance(exc, WorkerFailed):
        return 503, "unavailable", None, str(exc)
    if isinstance(exc, EnergonError):
        return 500, "internal_error", None, str(exc)
    return 500, "internal_error", None, f"{type(exc).__name__}: {exc}"


def error_from_reply(status: int, kind: str, field: str | None, message: str) -> EnergonError:
    """The exception a client raises for an error reply (the inverse of `describe_error`)."""
    if kind == "invalid_request":
        problem = (
            message[len(field) + 1 :] if field and message.startswith(field + " ") else message
        )
        return InvalidRequest(field or "request", problem)
    if kind == "overloaded":
        return Overloaded(message)
    for cls in (Unauthorized, TooLarge, NotFound, Unavailable):
        if kind == cls.kind:
            return cls(message, field)
    err = ServerError(message, field)
    err.status, err.kind = status, kind
    return err


# ------------------------------------------------------------------------------ client -> server


@dataclass(frozen=True)
class GenerateRequest:
    id: int | str
    prompt: str | list[int]
    params: SamplingParams
    stream: bool
    key: str | None


@dataclass(frozen=True)
class AbortRequest:
    id: int | str


class BadMessage(Exception):
    """A message that cannot be served; carries the error reply's id (None if unknown)."""

    def __init__(self, error: EnergonError, request_id: int | str | None = None):
        self.error = error
        self.request_id = request_id
        super().__init__(str(error))


_PARAM_FIELDS = frozenset(SamplingParams.__dataclass_fields__)


def _check_id(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidRequest("id", f"must be an int or a string (got {type(value).__name__})")
    if isinstance(value, str) and not 0 < len(value) <= MAX_ID_CHARS:
        raise InvalidRequest("id", f"must be 1 to {MAX_ID_CHARS} characters")
    return value


def params_from_dict(value: Any) -> SamplingParams:
    """SamplingParams from a plain map of its fields. Raises InvalidRequest naming the field."""
    if value is None:
        return SamplingParams()
    if not isinstance(value, dict):
        raise InvalidRequest("params", f"must be a map of SamplingParams fields (got {value!r})")
    unknown = sorted(str(k) for k in value if k not in _PARAM_FIELDS)
    if unknown:
        raise InvalidRequest(
            "params", f"has unknown field(s) {unknown}; known: {sorted(_PARAM_FIELDS)}"
        )
    try:
        return SamplingParams(**value)
    except InvalidRequest:
        raise
    except (TypeError, ValueError) as exc:  # e.g. stop_token_ids holding a non-number
        raise InvalidRequest("params", f"is malformed: {exc}") from None


def decode_request(frame: bytes, max_bytes: int) -> GenerateRequest | AbortRequest:
    """Parse and validate one client frame. Raises BadMessage (with the id when one was readable)."""
    if len(frame) > max_bytes:
        raise BadMessage(TooLarge(f"message is {len(frame)} bytes; the limit is {max_bytes}"))
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise BadMessage(InvalidRequest("message", f"is not valid msgpack ({exc})")) from None
    if not isinstance(msg, dict):
        raise BadMessage(InvalidRequest("message", f"must be a map (got {type(msg).__name__})"))
    request_id = msg.get("id")
    try:
        request_id = _check_id(request_id)
        if msg.get("v", VERSION) != VERSION:
            raise InvalidRequest("v", f"must be {VERSION} (got {msg.get('v')!r})")
        kind = msg.get("type", "generate")
        if kind == "abort":
            return AbortRequest(request_id)
        if kind != "generate":
            raise InvalidRequest("type", f"must be 'generate' or 'abort' (got {kind!r})")
        return GenerateRequest(
            id=request_id,
            prompt=_prompt(msg),
            params=params_from_dict(msg.get("params")),
            stream=_bool(msg, "stream"),
            key=_optional_str(msg, "key"),
        )
    except InvalidRequest as exc:
        raise BadMessage(exc, request_id if _valid_id(request_id) else None) from None


def _valid_id(value: Any) -> bool:
    try:
        _check_id(value)
        return True
    except InvalidRequest:
        return False


def _prompt(msg: dict) -> str | list[int]:
    has_text, has_ids = "prompt" in msg, "token_ids" in msg
    if has_text == has_ids:
        raise InvalidRequest("prompt", "give exactly one of 'prompt' (a string) or 'token_ids'")
    if has_text:
        if not isinstance(msg["prompt"], str) or not msg["prompt"]:
            raise InvalidRequest("prompt", "must be a non-empty string")
        return msg["prompt"]
    ids = msg["token_ids"]
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    ):
        raise InvalidRequest("token_ids", "must be a non-empty list of ints")
    return ids


def _bool(msg: dict, name: str) -> bool:
    value = msg.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(name, f"must be true or false (got {value!r})")
    return value


def _optional_str(msg: dict, name: str) -> str | None:
    value = msg.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(name, f"must be a string (got {type(value).__name__})")
    return value


def encode_generate(
    request_id: int | str,
    prompt: str | list[int],
    params: SamplingParams,
    stream: bool,
    key: str | None = None,
) -> bytes:
    """A client's generate frame."""
    msg = {"v": VERSION, "type": "generate", "id": request_id, "stream": stream}
    msg["prompt" if isinstance(prompt, str) else "token_ids"] = (
        prompt if isinstance(prompt, str) else list(prompt)
    )
    msg["params"] = params_to_dict(params)
    if key is not None:
        msg["key"] = key
    return msgpack.packb(msg)


def encode_abort(request_id: int | str) -> bytes:
    return msgpack.packb({"v": VERSION, "type": "abort", "id": request_id})


def params_to_dict(params: SamplingParams) -> dict:
    """Only the fields that differ from the defaults, as plain msgpack types."""
    default = SamplingParams()
    out = {}
    for name in _PARAM_FIELDS:
        value = getattr(params, name)
        if value != getattr(default, name):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


# ------------------------------------------------------------------------------ server -> client


def _logprob_rows(logprobs: list[TokenLogprob | None] | None) -> list[dict | None] | None:
    """Rows as the wire carries them (None stays None: a prompt's first token has no row)."""
    if logprobs is None:
        return None
    return [None if lp is None else lp.to_wire() for lp in logprobs]


def encode_delta(request_id: int | str, piece: StreamPiece) -> bytes:
    msg = {
        "v": VERSION,
        "type": "delta",
        "id": request_id,
        "text": piece.text,
        "token_ids": piece.token_ids,
    }
    if piece.logprobs is not None:
        msg["logprobs"] = _logprob_rows(piece.logprobs)
    return msgpack.packb(msg)


def encode_final(
    request_id: int | str,
    text: str,
    token_ids: list[int],
    finish_reason: str,
    usage: Usage,
    timings: Timings,
    message: str | None = None,
    logprobs: list[TokenLogprob] | None = None,
    prompt_logprobs: list[TokenLogprob | None] | None = None,
) -> bytes:
    msg = {
        "v": VERSION,
        "type": "final",
        "id": request_id,
        "text": text,
        "token_ids": token_ids,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "cached_tokens": usage.cached_tokens,
        },
        "timings": {
            "queued_s": timings.queued_s,
            "first_token_s": timings.first_token_s,
            "per_output_token_s": timings.per_output_token_s,
        },
        "message": message,
    }
    if logprobs is not None:
        msg["logprobs"] = _logprob_rows(logprobs)
    if prompt_logprobs is not None:
        msg["prompt_logprobs"] = _logprob_rows(prompt_logprobs)
    return msgpack.packb(msg)


def encode_error(request_id: int | str | None, exc: BaseException) -> bytes:
    status, kind, field, message = describe_error(exc)
    return msgpack.packb(
        {
            "v": VERSION,
            "type": "error",
            "id": request_id,
            "status": status,
            "kind": kind,
            "field": field,
            "message": message,
        }
    )


def decode_reply(frame: bytes) -> dict:
    """A server reply as a map; raises ValueError if it is not one."""
    msg = msgpack.unpackb(frame, raw=False)
    if not isinstance(msg, dict) or msg.get("type") not in ("delta", "final", "error"):
        raise ValueError(f"not an Energon reply: {msg!r:.200}")
    return msg


def logprobs_from_reply(msg: dict) -> list[TokenLogprob] | None:
    """A delta's or final's logprobs (None when the request asked for none)."""
    return _from_rows(msg.get("logprobs"))


def _from_rows(rows: list | None) -> list[TokenLogprob | None] | None:
    """`_logprob_rows` read back."""
    if rows is None:
        return None
    return [None if row is None else TokenLogprob.from_wire(row) for row in rows]


def timings_from_final(msg: dict) -> Timings:
    timings = msg.get("timings") or {}
    return Timings(
        timings.get("queued_s", 0.0),
        timings.get("first_token_s", 0.0),
        timings.get("per_output_token_s", 0.0),
    )


def completion_from_final(
    msg: dict, text: str, token_ids: list[int], logprobs: list[TokenLogprob] | None = None
) -> Completion:
    """A Completion from a final reply; `text` / `token_ids` / `logprobs` are everything
    received."""
    usage = msg.get("usage") or {}
    return Completion(
        text=text,
        token_ids=token_ids,
        finish_reason=msg["finish_reason"],
        usage=Usage(
            usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", len(token_ids)),
            usage.get("cached_tokens", 0),
        ),
        logprobs=logprobs,
        timings=timings_from_final(msg),
        prompt_logprobs=_from_rows(msg.get("prompt_logprobs")),
    )
