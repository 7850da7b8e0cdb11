"""Logit bias and repetition, frequency and presence penalties, on the worker that samples.

A penalty depends on what a sequence generated so far. With lookahead and pipeline stages the
controller does not know a sequence's last tokens when it sends the next step (they are still on
the device), so the sampling rank keeps each penalised sequence's counts itself, on the device:

- a row's params carry "seq" (its sequence id) when the request has a penalty;
- the first step that samples a sequence after its computation (re)started (admission, a
  preemption's recompute, a worker restart) also carries "history", the tokens it generated
  until then, and with a repetition penalty "prompt", its prompt's ids (step.py adds them);
- every token the rank samples for the row is counted right after the draw, on the device;
- a step's "release" lists the sequences that ended, whose counts are dropped.

On a row (as in vLLM, in this order; Hugging Face's processors alike): each logit_bias entry is
added; then, for the tokens seen in the prompt or output, a positive logit is divided by the
repetition penalty and a negative one multiplied by it; then frequency_penalty x (the token's
count in the output) and presence_penalty x (1 if it is there) are subtracted. The result is a
float32 copy: logprobs stay those of the raw logits.
"""

from __future__ import annotations

import torch

from energon.host_copy import to_device


class Penalties:
    """The token counts of the penalised sequences this rank samples, one row each in a table
    [capacity, vocab] that grows as needed; the logit changes they and logit_bias make."""

    def __init__(self, device: torch.device):
        self.device = device
        self.slots: dict[int, int] = {}  # sequence id -> row of the tables
        self._free: list[int] = []
        self.counts: torch.Tensor | None = None  # float32 [capacity, vocab]: output tokens
        self.seen: torch.Tensor | None = None  # bool [capacity, vocab]: prompt tokens
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, slots) to count

    def release(self, seq_ids) -> None:
        """Drop the counts of sequences that ended (unknown ids are ignored)."""
        for seq_id in seq_ids:
            slot = self.slots.pop(seq_id, None)
            if slot is not None:
                self._free.append(slot)

    def apply(self, scores: torch.Tensor, params: list[dict]) -> torch.Tensor:
        """`scores`, or a float32 copy with each row's bias and penalties applied. Call `count`
        with the tokens drawn from it before the next `apply`."""
        self._pending = None
        biased = [i for i, p in enumerate(params) if "bias_ids" in p]
        penalised = [i for i, p in enumerate(params) if "seq" in p]
        if not biased and not penalised:
            return scores
        x = scores.to(torch.float32, copy=True)
        vocab = x.shape[-1]
        if biased:
            pairs = [
                (i * vocab + t, v)
                for i in biased
                for t, v in zip(params[i]["bias_ids"], params[i]["bias_values"], strict=True)
                if t < vocab
            ]
            flat, values = [f for f, _ in pairs], [v for _, v in pairs]
            x.view(-1).index_add_(
                0, to_device(flat, torch.int64, x.device), to_device(values, x.dtype, x.device)
            )
        if penalised:
            self._penalise(x, [params[i] for i in penalised], penalised)
        return x

    def count(self, token_ids: torch.Tensor) -> None:
        """Count the tokens drawn for the penalised rows of the last `apply` (on the device)."""
        if self._pending is None:
            return
        rows, slots = self._pending
        self._pending = None
        vocab = self.counts.shape[1]
        flat = slots * vocab + token_ids.index_select(0, rows)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))

    def _penalise(self, x: torch.Tensor, params: list[dict], rows: list[int]) -> None:
        for p in params:
            if "history" in p:
                self._start(p, x.shape[-1])
        try:
            slot_list = [self.slots[p["seq"]] for p in params]
        except KeyError as exc:
            raise ValueError(
                f"no token counts for sequence {exc.args[0]}: its first step after a (re)start "
                "must carry its history"
            ) from None
        device = x.device
        rows_t = to_device(rows, torch.int64, device)
        slots = to_device(slot_list, torch.int64, device)
        self._pending = (rows_t, slots)
        counts = self.counts.index_select(0, slots)
        xr = x.index_select(0, rows_t)
        repetition = [float(p.get("repetition_penalty", 1.0)) for p in params]
        if any(r != 1.0 for r in repetition):
            r = to_device(repetition, torch.float32, device).unsqueeze(1)
            seen = (counts > 0) | self.seen.index_select(0, slots)
            xr = torch.where(seen, torch.where(xr < 0, xr * r, xr / r), xr)
        frequency = [float(p.get("frequency_penalty", 0.0)) for p in params]
        if any(frequency):
            xr -= to_device(frequency, torch.float32, device).unsqueeze(1) * counts
        presence = [float(p.get("presence_penalty", 0.0)) for p in params]
        if any(presence):
            xr -= to_device(presence, torch.float32, device).unsqueeze(1) * (counts > 0)
        x.index_copy_(0, rows_t, xr)

    def _start(self, p: dict, vocab: int) -> None:
        """(Re)start a sequence's counts from its history and prompt."""
        slot = self.slots.get(p["seq"])
        if slot is None:
            slot = self._allocate(vocab)
            self.slots[p["seq"]] = slot
        counts, seen = self.counts[slot], self.seen[slot]
        counts.zero_()
        seen.zero_()
        history = [t for t in p["history"] if t < vocab]
        if history:
            ids = to_device(history, torch.int64, self.device)
            counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))
        prompt = [t for t in p.get("prompt", ()) if t < vocab]
        if prompt:
            seen.index_fill_(0, to_device(prompt, torch.int64, self.device), True)

    def _allocate(self, vocab: int) -> int:
        if self._free:
            return self._free.pop()
        used = len(self.slots)
        if self.counts is None or self.counts.shape[1] != vocab:
            if self.slots:
                raise ValueError(f"logits of {vocab} columns where the counts have another width")
            self.counts = torch.zeros((0, vocab), dtype=torch.float32, device=self.device)
            self.seen = torch.zeros((0, vocab), dtype=torch.bool, device=self.device)
        if used == self.counts.shape[0]:  # full: double the tables
            grown = max(8, 2 * used)
            self.counts = _grow(self.counts, grown)
            self.seen = _grow(self.seen, grown)
            self._free.extend(range(grown - 1, used, -1))
            return used
        raise AssertionError("a free slot was expected")  # every slot is in slots or _free


def _grow(table: torch.Tensor, rows: int) -> torch.Tensor:
    grown = torch.zeros((rows, table.shape[1]), dtype=table.dtype, device=table.device)
    grown[: table.shape[0]] = table
    return grown
