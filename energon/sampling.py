"""What a request asks for (SamplingParams) and what it gets back (Completion, StreamPiece).

Controller side: plain dataclasses, no torch. `SamplingParams` checks itself when built, so a bad
argument raises `InvalidRequest` naming the field before anything is queued; the Engine calls
`validate(max_tokens_cap=..., vocab_size=...)` again with the limits only it knows. Only the
fields the worker's Sampler reads cross the wire (`to_wire`); stop strings, stop token ids, EOS
and max_tokens are decided on the controller, where the token ids come back.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from energon.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries: they travel with a sequence's first row after each (re)start
LOGIT_BIAS_LIMIT = 100.0  # as OpenAI's
PENALTY_LIMIT = 2.0  # presence and frequency, as OpenAI's
SEED_LIMIT = 2**63
TOP_K_LIMIT = 2**63
GREEDY_BELOW = 1e-5  # a smaller temperature is greedy: dividing by it would overflow float32

FinishReason = Literal["stop", "length", "abort"]


class RowFeature:
    """What a sampled row needs beyond a greedy argmax, as bits of a plain int (an IntFlag's
    operators cost microseconds, per row). A step's "features" are its rows' ORed (the
    controller keeps each request's), so the worker's Sampler looks at the rows' params for a
    feature only when some row has it."""

    DRAWN = 1  # drawn, not greedy
    BANNED = 2  # min_tokens: its stop ids are banned until then
    STATEFUL = 4  # a penalty or a logit_bias: the sampling rank keeps its tokens (penalties.py)
    LOGPROBS = 8
    ALL = 15


def drawn(wire: dict) -> bool:
    """Whether a row with these wire params is drawn, not greedy (SamplingParams.greedy)."""
    return wire["temperature"] >= GREEDY_BELOW and wire["top_k"] != 1


def row_features(wire: dict) -> int:
    """The RowFeature bits of one row's wire params (SamplingParams.to_wire(), plus what the
    controller's Request adds)."""
    features = 0
    if drawn(wire):
        features |= RowFeature.DRAWN
    if "banned" in wire:
        features |= RowFeature.BANNED
    if "seq" in wire or "bias_ids" in wire:
        features |= RowFeature.STATEFUL
    if wire["logprobs"]:
        features |= RowFeature.LOGPROBS
    return features


def step_features(params: list[dict], features: int | None = None) -> int:
    """The RowFeature bits of a step's rows ORed: `features` when the step message carries
    them (the controller keeps each request's), else worked out from the rows' params."""
    if features is not None:
        return features
    bits = 0
    for wire in params:
        bits |= row_features(wire)
    return bits


def _is_int(value: object) -> bool:
    """True for Python and numpy integers, False for bool (an int subclass that is never meant)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request. `temperature=0` is greedy (argmax); `top_k=0` and `top_p=1`
    are off. Raises `InvalidRequest(field, ...)` for any out-of-range or wrongly typed value.

    `stop` (a string or sequence of strings) is normalised to a tuple of strings and
    `stop_token_ids` to a tuple of ints. `logprobs=k` returns, per generated token, its log
    probability under the model's raw distribution (before temperature/top-k/top-p) and the k most
    likely tokens with theirs. `min_tokens=m` (as in vLLM) keeps the stop token ids (EOS unless
    ignore_eos) from being drawn as any of the first m tokens, and stop strings count only once
    they end in the m-th token's text or later. The text ends before the stop string that ended
    it, or with it when `include_stop_str_in_output` (vLLM's). `prompt_logprobs=k` (vLLM's; None
    for none) also returns, per prompt token, its log probability given the tokens before it and
    the k most likely tokens there (the first token's entry is None), as `Engine.prompt_logprobs`
    computes them.

    Before the draw (as in vLLM and OpenAI): `logit_bias` ({token id: bias in [-100, 100]}, or
    (id, bias) pairs) is added to those logits; `repetition_penalty` r divides the positive
    logits of the tokens in the prompt or output by r and multiplies the negative ones by r
    (Hugging Face's and vLLM's; 1 is off); `frequency_penalty` f and `presence_penalty` p
    subtract f x (times the token is in the output) and p x (1 if it is there at all). `min_p`
    (vLLM's and Hugging Face's) keeps, after top-k and top-p, the tokens at least min_p times as
    likely as the most likely one. logprobs are unaffected by all of these.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    logprobs: int = 0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] | Sequence[tuple[int, float]] = ()
    min_p: float = 0.0
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None

    def __post_init__(self):
        self._check()
        # Normalise to plain Python types so hashing, equality and msgpack behave.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "max_tokens", int(self.max_tokens))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_k", int(self.top_k))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "seed", None if self.seed is None else int(self.seed))
        object.__setattr__(self, "logprobs", int(self.logprobs))
        if self.prompt_logprobs is not None:
            object.__setattr__(self, "prompt_logprobs", int(self.prompt_logprobs))
        object.__setattr__(self, "min_tokens", int(self.min_tokens))
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_p"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))

    @property
    def greedy(self) -> bool:
        """True when the token is the argmax: temperature 0 (any below 1e-5, as in vLLM) or
        top_k 1."""
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """True when a penalty depends on the tokens seen (the sampling rank keeps them)."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    def validate(
        self, max_tokens_cap: int | None = None, vocab_size: int | None = None
    ) -> SamplingParams:
        """Check every field, plus `max_tokens <= max_tokens_cap` and `stop_token_ids <
        vocab_size` when given. Returns self; raises `InvalidRequest` naming the field."""
        self._check()
        if max_tokens_cap is not None and self.max_tokens > max_tokens_cap:
            raise InvalidRequest(
                "max_tokens",
                f"must be <= {max_tokens_cap}, the room left in the context window "
                f"(got {self.max_tokens!r})",
            )
        if vocab_size is not None:
            for token in self.stop_token_ids:
                if token >= vocab_size:
                    raise InvalidRequest(
                        "stop_token_ids",
                        f"must be token ids < the vocabulary size {vocab_size} (got {token!r})",
                    )
            for token, _ in self.logit_bias:
                if token >= vocab_size:
                    raise InvalidRequest(
                        "logit_bias",
                        f"must be keyed by token ids < the vocabulary size {vocab_size} (got {token!r})",
                    )
        return self

    def to_wire(self) -> dict:
        """The fields the worker's Sampler reads, as a msgpack-friendly dict of plain types."""
        wire = {
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "logprobs": self.logprobs,
        }
        if self.penalised:
            wire["presence_penalty"] = self.presence_penalty
            wire["frequency_penalty"] = self.frequency_penalty
            wire["repetition_penalty"] = self.repetition_penalty
        if self.min_p:
            wire["min_p"] = self.min_p
        if self.logit_bias:
            wire["bias_ids"] = [t for t, _ in self.logit_bias]
            wire["bias_values"] = [b for _, b in self.logit_bias]
        return wire

    def _check(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequest("max_tokens", f"must be an int >= 1 (got {self.max_tokens!r})")

        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise InvalidRequest(
                "temperature", f"must be a finite number >= 0, 0 for greedy (got {t!r})"
            )

        # bounded like the seed: the wire carries it as an int64 (a larger k is simply "off")
        if not _is_int(self.top_k) or not 0 <= self.top_k < TOP_K_LIMIT:
            raise InvalidRequest(
                "top_k", f"must be an int in [0, 2**63), 0 for off (got {self.top_k!r})"
            )

        p = self.top_p
        if not _is_real(p) or not 0.0 < p <= 1.0:  # NaN fails the comparison too
            raise InvalidRequest("top_p", f"must be a number in (0, 1], 1 for off (got {p!r})")

        s = self.seed
        if s is not None and (not _is_int(s) or not 0 <= s < SEED_LIMIT):
            raise InvalidRequest("seed", f"must be None or an int in [0, 2**63) (got {s!r})")

        self._check_stop()

        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidRequest("stop_token_ids", f"must be a list of ints >= 0 (got {ids!r})")
        for token in ids:
            if not _is_int(token) or token < 0:
                raise InvalidRequest(
                    "stop_token_ids", f"must be a list of ints >= 0 (got {token!r} in {ids!r})"
                )

        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(name, f"must be True or False (got {getattr(self, name)!r})")

        m = self.min_tokens
        if not _is_int(m) or not 0 <= m <= self.max_tokens:
            raise InvalidRequest(
                "min_tokens", f"must be an int in [0, max_tokens={self.max_tokens}] (got {m!r})"
            )

        k = self.logprobs
        if not _is_int(k) or not 0 <= k <= MAX_LOGPROBS:
            raise InvalidRequest(
                "logprobs", f"must be an int in [0, {MAX_LOGPROBS}], 0 for none (got {k!r})"
            )
        k = self.prompt_logprobs
        if k is not None and (not _is_int(k) or not 0 <= k <= MAX_LOGPROBS):
            raise InvalidRequest(
                "prompt_logprobs",
                f"must be None or an int in [0, {MAX_LOGPROBS}] (got {k!r})",
            )

        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -PENALTY_LIMIT <= v <= PENALTY_LIMIT:
                raise InvalidRequest(name, f"must be a number in [-2, 2], 0 for off (got {v!r})")
        r = self.repetition_penalty
        if not _is_real(r) or not math.isfinite(r) or r <= 0:
            raise InvalidRequest(
                "repetition_penalty", f"must be a finite number > 0, 1 for off (got {r!r})"
            )
        _bias_pairs(self.logit_bias)

        m = self.min_p
        if not _is_real(m) or not 0.0 <= m <= 1.0:  # NaN fails the comparison too
            raise InvalidRequest("min_p", f"must be a number in [0, 1], 0 for off (got {m!r})")

    def _check_stop(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, bytes) or not isinstance(stop, Sequence):
            raise InvalidRequest(
                "stop", f"must be a string or a list of non-empty strings (got {self.stop!r})"
            )
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                "stop", f"must be at most {MAX_STOP_STRINGS} strings (got {len(stop)})"
            )
        for s in stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequest(
                    "stop", f"must be non-empty strings (got {s!r} in {self.stop!r})"
                )


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
    """logit_bias as (token id, bias) pairs sorted by id; raises InvalidRequest("logit_bias")."""
    if isinstance(bias, Mapping):
        pairs = list(bias.items())
    elif isinstance(bias, (str, bytes)) or not isinstance(bias, Sequence):
        raise InvalidRequest(
            "logit_bias", f"must be a map of token id to bias, or (id, bias) pairs (got {bias!r})"
        )
    else:
        pairs = list(bias)
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            "logit_bias", f"must be at most {MAX_LOGIT_BIAS} entries (got {len(pairs)})"
        )
    out = {}
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InvalidRequest("logit_bias", f"must be (token id, bias) pairs (got {pair!r})")
        token, value = pair
        if not _is_int(token) or token < 0:
            raise InvalidRequest("logit_bias", f"must be keyed by token ids >= 0 (got {token!r})")
        if not _is_real(value) or not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT:
            raise InvalidRequest(
                "logit_bias", f"must be biases in [-100, 100] (got {value!r} for token {token})"
            )
        if int(token) in out:
            raise InvalidRequest(
                "logit_bias", f"must be keyed by distinct token ids (got {token} twice)"
            )
        out[int(token)] = float(value)
    return tuple(sorted(out.items()))


@dataclass
class Usage:
    """Token counts of one request; total_tokens = prompt_tokens + completion_tokens.
    cached_tokens: prompt tokens it found in the prefix cache when first scheduled (not computed;
    OpenAI's usage.prompt_tokens_details.cached_tokens)."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    total_tokens: int = field(init=False)

    def __post_init__(self):
        self.total_tokens = self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Seconds: waiting before the first step, from arrival to the first token, and the mean
    time between later tokens (0.0 with fewer than two tokens)."""

    queued_s: float
    first_token_s: float
    per_output_token_s: float


@dataclass
class TokenLogprob:
    """One generated token's log probability under the raw model distribution (log_softmax of
    the logits, before temperature/top-k/top-p) and the k most likely (token id, logprob), most
    likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]

    @classmethod
    def from_wire(cls, row: dict) -> TokenLogprob:
        """From one row of `Sampler.sample`'s logprobs list."""
        top = list(zip(row["top_ids"], row["top_logprobs"], strict=True))
        return cls(row["token_id"], row["logprob"], top)

    def to_wire(self) -> dict:
        """The row `from_wire` reads back, as plain msgpack types (the ZeroMQ door sends it)."""
        return {
            "token_id": self.token_id,
            "logprob": self.logprob,
            "top_ids": [t for t, _ in self.top],
            "top_logprobs": [lp for _, lp in self.top],
        }


@dataclass
class Completion:
    """A finished request: the generated text and ids (prompt excluded), why it ended, token
    counts, per-token logprobs (None unless asked for), timings, and with `prompt_logprobs` one
    entry per prompt token (the first None)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    timings: Timings | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class StreamPiece:
    """What `Engine.stream` yields: text and token ids new since the previous piece (text may be
    empty while a multi-byte character or a possible stop string is held back); the last piece
    carries finish_reason and the request's timings and usage (and its prompt_logprobs when
    asked for). `logprobs` (when asked for) has one entry per id of `token_ids`."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None
    timings: Timings | None = None
    usage: Usage | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


CompletionChunk = StreamPiece
