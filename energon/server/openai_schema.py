"""OpenAI's /v1/completions and /v1/chat/completions: request bodies -> (prompts,
SamplingParams), and Energon's results -> OpenAI's response and stream-chunk objects.

Validation is strict about types (a string max_tokens is a 400 naming the field) and about
features Energon does not have (best_of, suffix, chat's echo, vLLM's beam search): those are
refused with a message rather than silently ignored. presence_penalty, frequency_penalty,
logit_bias (token id strings as keys, as OpenAI's) and completions' echo are served, and so are
vLLM's `top_k`, `min_p`, `repetition_penalty`, `stop_token_ids`, `ignore_eos`, `min_tokens` and
`include_stop_str_in_output`.
Other unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, replace

from energon.errors import InvalidRequest
from energon.sampling import MAX_LOGPROBS, SEED_LIMIT, SamplingParams, Usage
from energon.server.chat import parse_messages, render_chat
from energon.server.frontend import Limits
from energon.server.messages import NotFound
from energon.server.openai_logprobs import engine_logprobs


@dataclass(frozen=True)
class OpenAIRequest:
    """A parsed request: one or more prompts (text or token ids), how to sample, how to answer."""

    prompts: list[str | list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage
    chat: bool
    top_logprobs: int | None = None  # alternatives shown per token; None: no logprobs at all
    fill_context: bool = False  # chat without max_tokens: up to the room left in the context
    n: int = 1  # choices per prompt
    echo: bool = False  # completions: each choice's text (and logprobs) start with the prompt's

    def choice_params(self) -> list[SamplingParams]:
        """Each choice's params, prompt-major (choice index = prompt index * n + j): the j-th of
        a prompt draws with seed + j when a seed is given, so the n samples differ yet the
        request reproduces."""
        p = self.params
        if p.seed is None:
            return [p] * (len(self.prompts) * self.n)
        seeded = [replace(p, seed=(p.seed + j) % SEED_LIMIT) for j in range(self.n)]
        return seeded * len(self.prompts)


def parse_completion(body: dict, limits: Limits, model_name: str) -> OpenAIRequest:
    """A /v1/completions body. Raises InvalidRequest (400) or NotFound (404, unknown model)."""
    _check_model(body, model_name)
    prompts = _prompts(body.get("prompt"), limits)
    if body.get("suffix"):
        raise InvalidRequest("suffix", "is not supported by Energon")
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest("best_of", f"must be 1 (got {body.get('best_of')!r})")
    top_logprobs = _count(body, "logprobs")
    stream = _bool(body, "stream")
    return OpenAIRequest(
        prompts=prompts,
        params=_params(body, body.get("max_tokens", 16), "max_tokens", top_logprobs),
        stream=stream,
        include_usage=_include_usage(body, stream),
        chat=False,
        top_logprobs=top_logprobs,
        n=_choices(body, len(prompts), limits),
        echo=_bool(body, "echo"),
    )


def parse_chat(body: dict, limits: Limits, model_name: str, tokenizer) -> OpenAIRequest:
    """A /v1/chat/completions body, rendered with the chat template. Raises like
    parse_completion."""
    _check_model(body, model_name)
    prompt = render_chat(tokenizer, parse_messages(body.get("messages")))
    top_logprobs = _count(body, "top_logprobs")
    if _bool(body, "logprobs"):
        top_logprobs = top_logprobs or 0
    elif top_logprobs is not None:
        raise InvalidRequest("top_logprobs", "needs logprobs set to true")
    for name in ("tools", "functions", "response_format", "echo"):
        if body.get(name):
            raise InvalidRequest(name, "is not supported by Energon")
    # OpenAI's chat default is the rest of the context window: the server's limit here, which
    # the Frontend lowers to the room the rendered prompt leaves (fill_context).
    fill = body.get("max_completion_tokens") is None and body.get("max_tokens") is None
    if body.get("max_completion_tokens") is not None:
        max_tokens, field = body["max_completion_tokens"], "max_completion_tokens"
    else:
        max_tokens, field = body.get("max_tokens", limits.max_tokens), "max_tokens"
    stream = _bool(body, "stream")
    return OpenAIRequest(
        prompts=[prompt],
        params=_params(body, max_tokens, field, top_logprobs),
        stream=stream,
        include_usage=_include_usage(body, stream),
        chat=True,
        top_logprobs=top_logprobs,
        fill_context=fill,
        n=_choices(body, 1, limits),
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


def _choices(body: dict, prompts: int, limits: Limits) -> int:
    """`n`: choices per prompt, while prompts x n stays within the server's max_prompts."""
    value = body.get("n")
    if value is None:
        return 1
    most = max(1, limits.max_prompts // prompts)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidRequest(
            "n",
            f"must be an int in [1, {most}]: this server makes at most {limits.max_prompts} "
            f"choices a request (got {value!r})",
        )
    return value


def _count(body: dict, name: str) -> int | None:
    """An optional int in [0, MAX_LOGPROBS]: how many alternatives to show per token."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise InvalidRequest(name, f"must be an int in [0, {MAX_LOGPROBS}] (got {value!r})")
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


# Sampling controls Energon does not have, with the value that means "off": anything else is
# refused, since ignoring it would answer a different question than the one asked.
_UNSUPPORTED = {
    "use_beam_search": False,  # vLLM's extension
}


def _params(
    body: dict, max_tokens, max_tokens_field: str, top_logprobs: int | None
) -> SamplingParams:
    for name, off in _UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and (value != off or isinstance(value, bool) != isinstance(off, bool)):
            raise InvalidRequest(name, f"is not supported by Energon (only {json.dumps(off)})")
    if body.get("prompt_logprobs") is not None:  # vLLM's; its reply format is its own
        raise InvalidRequest(
            "prompt_logprobs",
            "is not served at the HTTP door: use completions' echo with logprobs (the ZeroMQ "
            "door and the Engine take it)",
        )
    fields = {
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),  # extensions, as in vLLM
        "seed": body.get("seed"),
        "stop": body.get("stop"),
        "stop_token_ids": body.get("stop_token_ids"),
        "min_tokens": body.get("min_tokens"),
        "ignore_eos": body.get("ignore_eos"),
        "include_stop_str_in_output": body.get("include_stop_str_in_output"),
        "presence_penalty": body.get("presence_penalty"),
        "frequency_penalty": body.get("frequency_penalty"),
        "repetition_penalty": body.get("repetition_penalty"),
        "min_p": body.get("min_p"),
        "logit_bias": _logit_bias(body.get("logit_bias")),
    }
    kwargs = {k: v for k, v in fields.items() if v is not None}
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    kwargs["logprobs"] = engine_logprobs(top_logprobs)
    try:
        return SamplingParams(**kwargs)
    except InvalidRequest as exc:
        if exc.field == "max_tokens" and max_tokens_field != "max_tokens":
            raise InvalidRequest(max_tokens_field, exc.problem) from None
        raise


def _logit_bias(value) -> dict | None:
    """OpenAI's logit_bias, {"token id": bias}, with int keys (SamplingParams checks the rest)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequest("logit_bias", f"must be an object of token id to bias (got {value!r})")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise InvalidRequest("logit_bias", f"must be keyed by token ids (got {key!r})")
        out[int(key)] = bias
    return out


# ------------------------------------------------------------------------------ responses


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage_dict(usage: Usage) -> dict:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def response(
    req_id: str,
    model: str,
    chat: bool,
    choices: list[tuple[str, str, dict | None]],
    usage: Usage,
) -> dict:
    """A whole (non-streamed) response; `choices` are (text, finish_reason, logprobs object or
    None) in prompt order."""
    if chat:
        rows = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": reason,
            }
            for i, (text, reason, logprobs) in enumerate(choices)
        ]
    else:
        rows = [
            {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}
            for i, (text, reason, logprobs) in enumerate(choices)
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
    logprobs: dict | None = None,
    index: int = 0,
) -> dict:
    """One stream chunk of choice `index`. `text=None` with usage gives the usage-only last
    chunk (no choices); `logprobs` is the object of the chunk's tokens (openai_logprobs)."""
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
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
    else:
        choice = {
            "index": index,
            "text": text or "",
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
    out["choices"] = [choice]
    return out


class DeltaTemplate:
    """A stream's middle chunks (text, no finish_reason) pre-rendered around their text, so each
    costs one json.dumps of a string: the door's cost per token is what `energon bench serve`
    measures against the in-process Engine."""

    _MARK = "\x00energon-text\x00"

    def __init__(self, req_id: str, model: str, chat: bool, index: int = 0):
        whole = chunk(req_id, model, chat, self._MARK, index=index)
        whole = json.dumps(whole, separators=(",", ":"))
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
