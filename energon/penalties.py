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
from energon.sampling import RowFeature


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

    def apply(
        self, scores: torch.Tensor, params: list[dict], features: int = RowFeature.ALL
    ) -> torch.Tensor:
        """`scores`, or a float32 copy with each row's bias and penalties applied. Call `count`
        with the tokens drawn from it before the next `apply`. `features` (RowFeatures of the
        rows, ORed) spares looking for what no row has."""
        self._pending = None
        biased = penalised = ()
        if features & RowFeature.BIAS:
            biased = [i for i, p in enumerate(params) if "bias_ids" in p]
        if features & RowFeature.PENALISED:
            penalised = [i for i, p in enumerate(params) if "seq" in p]
        if not biased and not penalised:
            return scores
        x = scores.to(torch.float32, copy=True)
        if biased:
            self._bias(x, [params[i] for i in biased], biased)
        if penalised:
            self._penalise(x, [params[i] for i in penalised], penalised)
        return x

    def _bias(self, x: torch.Tensor, params: list[dict], rows: list[int]) -> None:
        """Add the rows' logit_bias: their ids and values go to the device in two copies, and
        each id's row is spread there (ids past the logits' width add nothing)."""
        vocab, device = x.shape[-1], x.device
        ids: list[int] = []
        values: list[float] = []
        counts = []
        for p in params:
            ids += p["bias_ids"]
            values += p["bias_values"]
            counts.append(len(p["bias_ids"]))
        packed = to_device(rows + counts + ids, torch.int64, device)
        n = len(rows)
        row_of = torch.repeat_interleave(packed[:n], packed[n : 2 * n], output_size=len(ids))
        token = packed[2 * n :]
        inside = token < vocab
        flat = row_of * vocab + token.clamp(max=vocab - 1)
        add = to_device(values, torch.float32, device).masked_fill_(~inside, 0.0)
        x.view(-1).index_add_(0, flat, add)

    def count(self, token_ids: torch.Tensor) -> None:
        """Count the tokens drawn for the penalised rows of the last `apply` (on the device)."""
        if self._pending is None:
            return
        rows, slots = self._pending
        self._pending = None
        vocab = self.counts.shape[1]
        drawn = (
            token_ids if rows.shape[0] == token_ids.shape[0] else token_ids.index_select(0, rows)
        )
        flat = slots * vocab + drawn
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
        n = len(rows)
        index = to_device(rows + slot_list, torch.int64, device)  # one copy each way of type
        rows_t, slots = index[:n], index[n:]
        self._pending = (rows_t, slots)
        repetition, frequency, presence = [], [], []
        for p in params:
            repetition.append(float(p.get("repetition_penalty", 1.0)))
            frequency.append(float(p.get("frequency_penalty", 0.0)))
            presence.append(float(p.get("presence_penalty", 0.0)))
        table = to_device(repetition + frequency + presence, torch.float32, device).view(3, n, 1)
        counts = self.counts.index_select(0, slots)
        whole = n == x.shape[0] and rows == list(range(n))
        xr = x if whole else x.index_select(0, rows_t)
        if any(r != 1.0 for r in repetition):
            r = table[0]
            seen = (counts > 0) | self.seen.index_select(0, slots)
            xr = torch.where(seen, torch.where(xr < 0, xr * r, xr / r), xr)
        if any(frequency):
            xr = xr - table[1] * counts
        if any(presence):
            xr = xr - table[2] * (counts > 0)
        if whole:
            if xr is not x:
                x.copy_(xr)
        else:
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
