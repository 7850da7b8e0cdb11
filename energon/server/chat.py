"""Chat messages -> one prompt string: the checkpoint's chat template, or a plain fallback.

Hugging Face chat templates are Jinja; they are rendered in Jinja's sandbox, as `transformers`
does, with `messages`, `add_generation_prompt=True`, `bos_token`, `eos_token` and
`raise_exception`. A checkpoint without a template (the random-weight presets) gets
"role: content" lines followed by "assistant:".
"""

from __future__ import annotations

from functools import lru_cache

from energon.errors import InvalidRequest

ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(value) -> list[dict]:
    """Validate OpenAI chat messages; content may be a string or a list of text parts.
    Returns [{"role", "content": str}]; raises InvalidRequest("messages", ...)."""
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise InvalidRequest("messages", f"[{i}] must be an object (got {msg!r:.80})")
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRequest("messages", f"[{i}].role must be one of {ROLES} (got {role!r})")
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text":
                    raise InvalidRequest(
                        "messages", f"[{i}].content parts must be {{type: 'text', text}} objects"
                    )
                if not isinstance(part.get("text"), str):
                    raise InvalidRequest("messages", f"[{i}].content part text must be a string")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise InvalidRequest("messages", f"[{i}].content must be a string or text parts")
        out.append({"role": role, "content": content})
    return out


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The prompt for `messages`. Raises InvalidRequest if the template rejects them."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nassistant:"
    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=_special_text(tokenizer, getattr(tokenizer, "bos_token_id", None)),
            eos_token=_special_text(tokenizer, getattr(tokenizer, "eos_token_id", None)),
        )
    except InvalidRequest:
        raise
    except (
        Exception
    ) as exc:  # jinja2 raises TemplateError subclasses and whatever the template does
        raise InvalidRequest("messages", f"were rejected by the chat template: {exc}") from None


def _raise(message: str):
    raise InvalidRequest("messages", f"were rejected by the chat template: {message}")


@lru_cache(maxsize=4)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def _special_text(tokenizer, token_id: int | None) -> str:
    """The text of a special token, e.g. '<s>' (templates print it); '' when unknown."""
    rust = getattr(tokenizer, "_tok", None)  # HFTokenizer keeps the `tokenizers` object here
    if token_id is None or rust is None:
        return ""
    return rust.id_to_token(token_id) or ""
