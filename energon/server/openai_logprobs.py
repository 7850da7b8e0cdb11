"""OpenAI's logprobs objects from the Engine's per-token `TokenLogprob`s.

/v1/completions (`logprobs: n`) answers with parallel lists

    {"tokens": ["Hel"], "token_logprobs": [-0.3], "top_logprobs": [{"Hel": -0.3, ...}],
     "text_offset": [0]}

and /v1/chat/completions (`logprobs: true, top_logprobs: n`) with one entry per token

    {"content": [{"token": "Hel", "logprob": -0.3, "bytes": [72, 101, 108],
                  "top_logprobs": [{"token": ..., "logprob": ..., "bytes": [...]}, ...]}],
     "refusal": null}

A token's string is the tokenizer's decoding of that id alone (a byte-level token that holds part
of a character decodes to U+FFFD, as in vLLM). The values are the model's raw distribution, before
temperature / top-k / top-p (SamplingParams.logprobs). `text_offset` counts characters of the
completion from its start, also across the chunks of a stream; with `echo` the prompt's tokens
come first (`render_prompt`: the first has no logprob, null as in OpenAI's) and the offsets count
from the prompt's start.
"""

from __future__ import annotations

from collections.abc import Sequence

from energon.sampling import TokenLogprob


def engine_logprobs(top_n: int | None) -> int:
    """The `SamplingParams.logprobs` that serves a request showing `top_n` alternatives per token
    (None: no logprobs). Showing 0 still needs the chosen token's own, which k >= 1 brings."""
    return 0 if top_n is None else max(1, top_n)


class LogprobsRenderer:
    """Renders one choice's logprobs, piece by piece, for a request that asked for `top_n`."""

    def __init__(self, tokenizer, top_n: int, chat: bool):
        self.tokenizer = tokenizer
        self.top_n = top_n
        self.chat = chat
        self.offset = 0  # characters of the completion's tokens rendered so far
        self._strings: dict[int, str] = {}

    def render(self, logprobs: Sequence[TokenLogprob] | None) -> dict:
        """The logprobs object of the tokens `logprobs` describes (next in the completion)."""
        rows = list(logprobs or ())
        if self.chat:
            return {"content": [self._chat_entry(lp) for lp in rows], "refusal": None}
        tokens = [self._string(lp.token_id) for lp in rows]
        return self._lists(tokens, [lp.logprob for lp in rows], [self._top_map(lp) for lp in rows])

    def render_prompt(self, ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> dict:
        """The completions logprobs object of an echoed prompt: `logprobs` holds each token's
        after the first (Engine.prompt_logprobs); the first token's is null."""
        return self._lists(
            [self._string(t) for t in ids],
            [None] + [lp.logprob for lp in logprobs],
            [None] + [self._top_map(lp) for lp in logprobs],
        )

    def _lists(self, tokens: list[str], values: list, tops: list) -> dict:
        """OpenAI's parallel lists; text_offset runs on from the tokens rendered before."""
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _top_map(self, lp: TokenLogprob) -> dict[str, float]:
        """{token string: logprob} of the alternatives; where two ids show as the same string
        (halves of characters, U+FFFD) the more likely one's value is kept."""
        out: dict[str, float] = {}
        for token_id, logprob in lp.top[: self.top_n]:
            out.setdefault(self._string(token_id), logprob)
        return out

    def _chat_entry(self, lp: TokenLogprob) -> dict:
        entry = self._alternative(lp.token_id, lp.logprob)
        entry["top_logprobs"] = [self._alternative(t, v) for t, v in lp.top[: self.top_n]]
        return entry

    def _alternative(self, token_id: int, logprob: float) -> dict:
        token = self._string(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    def _string(self, token_id: int) -> str:
        token = self._strings.get(token_id)
        if token is None:
            token = self._strings[token_id] = self.tokenizer.decode([token_id])
        return token


def joined(first: dict, then: dict) -> dict:
    """Two completions logprobs objects as one (an echoed prompt's, then the completion's)."""
    return {key: first[key] + then[key] for key in first}
