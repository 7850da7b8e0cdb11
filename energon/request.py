"""One request's life on the controller: its tokens become text pieces, until it stops.

The Engine feeds a `Request` the token ids its sequence samples; the request turns them into
streamed `StreamPiece`s (text held back while it could be the start of a stop string or of an
unfinished character), decides when it is done (stop token, stop string, length) and keeps the
timings. Nothing here touches the workers or the scheduler.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from energon.sampling import (
    Completion,
    SamplingParams,
    StreamPiece,
    Timings,
    TokenLogprob,
    Usage,
    row_features,
)
from energon.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer


class Request:
    """A request's controller-side state. `pieces` is the queue its stream reads from; the last
    piece put there has a `finish_reason`, and an exception put there is raised to the reader.
    Without `stream` (an `infer` call) only that last piece is put, holding everything: its
    reader wakes once per request instead of once per token, and unless it has stop strings to
    look for, its tokens are decoded once, when it finishes, instead of token by token."""

    def __init__(
        self,
        seq_id: int,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        stream: bool = True,
    ):
        self.seq_id = seq_id
        self.stream = stream
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs else None
        self.finish_reason: str | None = None
        self.pieces: asyncio.Queue = asyncio.Queue()
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopChecker(params.stop, params.include_stop_str_in_output)
        self._text_per_token = stream or bool(self._stops.stop)
        self._stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self._stop_ids.update(tokenizer.eos_token_ids)
        self.wire_params = params.to_wire()  # what every step carries for it (step.py)
        # what its first sampled row after a (re)start adds: the sampling rank keeps it
        self.start_params = {}
        if "bias_ids" in self.wire_params:
            for name in ("bias_ids", "bias_values"):
                self.start_params[name] = self.wire_params.pop(name)
        if params.penalised or self.start_params:  # the sampling rank keeps its tokens
            self.wire_params["seq"] = seq_id
        self.wire_params_unbanned = self.wire_params  # once min_tokens are generated
        if params.min_tokens and self._stop_ids:  # the Sampler keeps these from being drawn
            self.wire_params = {
                **self.wire_params,
                "min_tokens": params.min_tokens,
                "banned": sorted(self._stop_ids),
            }
        self.features = row_features(self.wire_params)  # what its rows need (step.py)
        # its next sampling step carries its tokens so far: its computation (re)started (step.py)
        self.history_due = True
        self._text = ""  # generated text so far (cut at a stop string once found)
        self._sent_chars = 0  # chars of _text already streamed
        self._sent_tokens = 0  # token ids already streamed
        self.arrived = time.perf_counter()
        self.first_scheduled: float | None = None
        self.cached_tokens = 0  # prompt tokens found in the prefix cache when first scheduled
        # params.prompt_logprobs: the Engine's pass over the prompt, then its rows (first None)
        self.prompt_rows: asyncio.Future | None = None
        self.prompt_logprobs: list | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None

    @property
    def text(self) -> str:
        return self._text

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def on_scheduled(self, start: int = 0) -> None:
        """A step runs it from position `start`; the first one (its admission) starts after the
        prompt tokens found in the prefix cache."""
        if self.first_scheduled is None:
            self.first_scheduled = time.perf_counter()
            self.cached_tokens = start

    def ends_with(self, token_id: int) -> bool:
        """Whether this token, taken next, ends the request whatever the text says: a stop token
        id (EOS included) or the last of max_tokens. Only a stop string ends one otherwise."""
        n = len(self.token_ids) + 1  # this token's count
        return self._stops_at(token_id, n) or n >= self.params.max_tokens

    def on_token(self, token_id: int, logprob: dict | None = None) -> bool:
        """Take one sampled token; stream what became final. Returns True when the request is
        finished (stop token, stop string or max_tokens), after putting its last piece."""
        now = time.perf_counter()
        self.first_token = self.first_token or now
        self.last_token = now
        self.token_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(TokenLogprob.from_wire(logprob))
        if self._stops_at(token_id, len(self.token_ids)):
            return self._finish("stop", self._rest())
        if not self._text_per_token:
            if len(self.token_ids) >= self.params.max_tokens:
                return self._finish("length", self._rest())
            return False
        checked = len(self._text)
        self._text += self._detok.add(token_id)
        if len(self.token_ids) < self.params.min_tokens:  # no stop string ends here yet
            self._emit(self._stops.safe_len(self._text))
            return False
        check = self._stops.check(self._text, checked)
        if check.stopped:
            self._text = check.text
            return self._finish("stop")
        if len(self.token_ids) >= self.params.max_tokens:
            return self._finish("length", self._detok.finish())
        self._emit(check.safe_len)
        return False

    def _stops_at(self, token_id: int, count: int) -> bool:
        """Whether a stop token id (EOS included) taken as the count-th token ends the request:
        not before min_tokens tokens were generated."""
        return token_id in self._stop_ids and count > self.params.min_tokens

    def abort(self, error: BaseException | None = None) -> None:
        """End the request: with `error` the reader gets it raised; else finish_reason 'abort'."""
        if self.done:
            return
        if error is not None:
            self.finish_reason = "abort"
            self.pieces.put_nowait(error)
        else:
            self._finish("abort", "" if self._text_per_token else self._rest())

    def _rest(self) -> str:
        """The text not yet decoded: what the detokenizer holds back (an unfinished character),
        or, decoding only at the end, every token's but a stop token's, which adds none."""
        if self._text_per_token:
            return self._detok.finish()
        ids = self.token_ids
        if ids and ids[-1] in self._stop_ids:
            ids = ids[:-1]
        return (self._detok.add(ids) if ids else "") + self._detok.finish()

    def _finish(self, reason: str, tail: str = "") -> bool:
        if tail:  # text held back until now (an unfinished character) may complete a stop string
            check = self._stops.check(self._text + tail, len(self._text))
            self._text = check.text
            if check.stopped:
                reason = "stop"
        self.finish_reason = reason
        self._emit(len(self._text), reason)
        return True

    def _emit(self, upto: int, finish_reason: str | None = None) -> None:
        if finish_reason is None and not self.stream:
            return
        text = self._text[self._sent_chars : upto]
        ids = self.token_ids[self._sent_tokens :]
        if not text and not ids and finish_reason is None:
            return
        start = self._sent_tokens
        self._sent_chars = max(self._sent_chars, upto)
        self._sent_tokens = len(self.token_ids)
        logprobs = self.logprobs[start:] if self.logprobs is not None else None
        timings = usage = None
        if finish_reason is not None:
            timings, usage = self.timings(), self.usage()
        self.pieces.put_nowait(StreamPiece(text, ids, finish_reason, logprobs, timings, usage))

    def completion(self) -> Completion:
        """The finished request as a Completion (text, token ids, finish reason, usage, timings)."""
        return Completion(
            text=self._text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason or "abort",
            usage=self.usage(),
            logprobs=self.logprobs,
            timings=self.timings(),
            prompt_logprobs=self.prompt_logprobs,
        )

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), len(self.token_ids), self.cached_tokens)

    def timings(self) -> Timings:
        queued = (self.first_scheduled or self.arrived) - self.arrived
        first = (self.first_token - self.arrived) if self.first_token else 0.0
        per_token = 0.0
        if self.first_token and self.last_token and len(self.token_ids) > 1:
            per_token = (self.last_token - self.first_token) / (len(self.token_ids) - 1)
        return Timings(queued_s=queued, first_token_s=first, per_output_token_s=per_token)
