"""OpenAI's /v1/completions and /v1/chat/completions: request bodies -> (prompts,
SamplingParams), and Energon's results -> OpenAI's response and stream-chunk objects.

Validation is strict about types (a string max_tokens is a 400 naming the field) and about
features Energon does not have (n > 1, penalties, logit_bias, logprobs, echo, suffix): those are
refused with a message rather than silently ignored. Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from energon.errors import InvalidRequest
from energon.sampling import SamplingParams, Usage
from energon.server.chat import parse_messages, render_chat
from energon.server.frontend import Limits
from energon.server.messages import NotFound


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed request: one or more prompts (text or token ids), how to sample, how to answer."""

    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage
    chat: bool


def parse_completion(body: dict, limits: Limits, model_name: str) -> OpenAIRequest:
    """A /v1/completions body. Raises InvalidRequest (400) or NotFound (404, unknown model)."""
    _check_model(body, model_name)
    prompts = _prompts(body.get("prompt"), limits)
    for name in ("echo",):
        if body.get(name):
            raise InvalidRequest(name, "is not supported by Energon")
    if body.get("suffix"):
        raise InvalidRequest("suffix", "is not supported by Energon")
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest("best_of", f"must be 1 (got {body.get('best_of')!r})")
    if body.get("logprobs") not in (None, 0):
        raise InvalidRequest("logprobs", "is not supported by Energon's HTTP door yet")
    stream = _bool(body, "stream")
    if stream and len(prompts) > 1:
        raise InvalidRequest("prompt", "must be a single prompt when stream is true")
    return OpenAIRequest(
        prompts=prompts,
        params=_params(body, body.get("max_tokens", 16), "max_tokens"),
        stream=stream,
        include_usage=_include_usage(body, stream),
        chat=False,
    )


def parse_chat(body: dict, limits: Limits, model_name: str, tokenizer) -> OpenAIRequest:
    """A /v1/chat/completions body, rendered with the chat template. Raises like
    parse_completion."""
    _check_model(body, model_name)
    prompt = render_chat(tokenizer, parse_messages(body.get("messages")))
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs") not in (None, 0):
        raise InvalidRequest("logprobs", "is not supported by Energon's HTTP door yet")
    for name in ("tools", "functions", "response_format"):
        if body.get(name):
            raise InvalidRequest(name, "is not supported by Energon")
    if "max_completion_tokens" in body:
        max_tokens, field = body["max_completion_tokens"], "max_completion_tokens"
    else:
        max_tokens, field = body.get("max_tokens", limits.default_chat_max_tokens), "max_tokens"
    stream = _bool(body, "stream")
    return OpenAIRequest(
        prompts=[prompt],
        params=_params(body, max_tokens, field),
        stream=stream,
        include_usage=_include_usage(body, stream),
        chat=True,
    )


def _check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise InvalidRequest("model", f"must be a string (got {type(model).__name__})")
    if model != model_name:
        raise NotFound(
            f"model {model!r} is not served here; this server serves {model_name!r}", "model"
        )


def _prompts(value, limits: Limits) -> list[str | list[int]]:
    def is_ids(v) -> bool:
        return (
            isinstance(v, list)
            and bool(v)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        )

    if isinstance(value, str):
        prompts = [value]
    elif is_ids(value):
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or is_ids(p) for p in value):
        prompts = list(value)
    else:
        raise InvalidRequest(
            "prompt", "must be a string, a list of token ids, or a non-empty list of either"
        )
    if len(prompts) > limits.max_prompts:
        raise InvalidRequest(
            "prompt", f"holds {len(prompts)} prompts; the limit is {limits.max_prompts}"
        )
    if any(p == "" for p in prompts):
        raise InvalidRequest("prompt", "must not be empty")
    return prompts


def _bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidRequest(name, f"must be true or false (got {value!r})")
    return value


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise InvalidRequest("stream_options", "must be an object")
    if not stream:
        raise InvalidRequest("stream_options", "is only allowed when stream is true")
    return _bool(options, "include_usage")


def _params(body: dict, max_tokens, max_tokens_field: str) -> SamplingParams:
    if body.get("n") not in (None, 1):
        raise InvalidRequest("n", f"must be 1 (got {body.get('n')!r})")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise InvalidRequest(name, "is not supported by Energon (only 0)")
    if body.get("logit_bias"):
        raise InvalidRequest("logit_bias", "is not supported by Energon")
    fields = {
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),  # an extension (vLLM's too)
        "seed": body.get("seed"),
        "stop": body.get("stop"),
        "ignore_eos": body.get("ignore_eos"),
    }
    kwargs = {k: v for k, v in fields.items() if v is not None}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    try:
        return SamplingParams(**kwargs)
    except InvalidRequest as exc:
        if exc.field == "max_tokens" and max_tokens_field != "max_tokens":
            raise InvalidRequest(max_tokens_field, exc.problem) from None
        raise


# ------------------------------------------------------------------------------ responses


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage_dict(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def response(
    req_id: str, model: str, chat: bool, choices: list[tuple[str, str]], usage: Usage
) -> dict:
    """A whole (non-streamed) response; `choices` are (text, finish_reason) in prompt order."""
    if chat:
        rows = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
            for i, (text, reason) in enumerate(choices)
        ]
    else:
        rows = [
            {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
            for i, (text, reason) in enumerate(choices)
        ]
    return {
        "id": req_id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": rows,
        "usage": usage_dict(usage),
    }


def chunk(
    req_id: str,
    model: str,
    chat: bool,
    text: str | None,
    finish_reason: str | None = None,
    *,
    first: bool = False,
    usage: Usage | None = None,
) -> dict:
    """One stream chunk. `text=None` with usage gives the usage-only last chunk (no choices)."""
    out = {
        "id": req_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
    }
    if text is None and usage is not None:
        out["choices"] = []
        out["usage"] = usage_dict(usage)
        return out
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else {}
        if text and not first:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    out["choices"] = [choice]
    return out


class DeltaTemplate:
    """A stream's middle chunks (text, no finish_reason) pre-rendered around their text, so each
    costs one json.dumps of a string: the door's cost per token is what `energon bench serve`
    measures against the in-process Engine."""

    _MARK = "\x00energon-text\x00"

    def __init__(self, req_id: str, model: str, chat: bool):
        whole = json.dumps(chunk(req_id, model, chat, self._MARK), separators=(",", ":"))
        self.head, self.tail = whole.split(json.dumps(self._MARK))
        self.head = "data: " + self.head
        self.tail += "\n\n"

    def render(self, text: str) -> bytes:
        """The SSE event of one chunk carrying `text`."""
        return (self.head + json.dumps(text, ensure_ascii=False) + self.tail).encode()


def error_body(status: int, kind: str, field: str | None, message: str) -> dict:
    """OpenAI's error object."""
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }
    return {
        "error": {
            "message": message,
            "type": kinds.get(status, "server_error"),
            "param": field,
            "code": kind,
        }
    }
