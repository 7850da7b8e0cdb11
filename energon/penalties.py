"""Logit bias and repetition, frequency and presence penalties, on the worker that samples.

A penalty depends on what a sequence generated so far. With lookahead and pipeline stages the
controller does not know a sequence's last tokens when it sends the next step (they are still on
the device), so the sampling rank keeps each such sequence's tokens itself, on the device:

- a row's params carry "seq" (its sequence id) when the request has a penalty or a logit_bias;
- the first step that samples a sequence after its computation (re)started (admission, a
  preemption's recompute, a worker restart) also carries "history", the tokens it generated
  until then, with a repetition penalty "prompt", its prompt's ids, and with a logit_bias
  "bias_ids" and "bias_values" (step.py adds them; later rows carry neither);
- every token the rank samples for the row is appended to its tokens right after the draw, on
  the device;
- a step's "release" lists the sequences that ended, whose state is dropped.

On a row (as in vLLM, in this order; Hugging Face's processors alike): each logit_bias entry is
added; then, for the tokens seen in the prompt or output, a positive logit is divided by the
repetition penalty and a negative one multiplied by it; then frequency_penalty x (the token's
count in the output) and presence_penalty x (1 if it is there) are subtracted. The result is a
float32 copy: logprobs stay those of the raw logits.

All of it is sparse, as Hugging Face's processors are: per row only the positions of its bias
ids, prompt and output tokens are gathered and scattered, whatever the vocabulary. On CUDA with
triton that is one kernel a step (energon/kernels/penalty_kernels.py; ENERGON_TRITON_PENALTIES=0
turns it off); elsewhere the eager torch ops, a dozen small kernels, compute the same values bit
for bit. The tables hold token ids padded with `vocab`, which points at one scratch column past
the logits (the eager ops gather and scatter the pads there; the kernel masks them off).
"""

from __future__ import annotations

import numpy as np
import torch

from energon.host_copy import to_device
from energon.kernels import triton_kernels_for

ENV_SWITCH = "ENERGON_TRITON_PENALTIES"  # "0" keeps the eager torch ops on CUDA too

# what a sequence's rules need, bits of Penalties._kinds (kept on the host)
_REPETITION, _FREQUENCY, _PRESENCE, _BIAS = 1, 2, 4, 8
_FLOAT_TABLES = ("bias_values", "rules")  # the others hold token ids
_EMPTY = np.zeros(0, np.int64)


class Penalties:
    """Per sequence this rank samples with a penalty or a bias: its bias, prompt and output
    token ids, a row each in tables that grow as needed (lengths kept on the host)."""

    def __init__(self, device: torch.device, kernels=None):
        self.device = device
        # energon.kernels.penalty_kernels to run it in place of the eager ops whatever the
        # device (the tests pass it in Triton's interpreter); None: on CUDA when triton imports
        self._kernels = kernels
        self.slots: dict[int, int] = {}  # sequence id -> row of the tables
        self._free: list[int] = []
        self._capacity = 0
        self._vocab: int | None = None
        # int64 [capacity, width] each, padded with vocab; bias values float32 alike, padded 0
        self._tables: dict[str, torch.Tensor] = {}
        # per slot, the ids held in the tables of those names (numpy: a step reads them for
        # all its rows at once)
        self._lengths = {name: _EMPTY for name in ("output", "prompt", "bias_ids")}
        self._kinds = _EMPTY  # per slot: which of its rules are on
        # what `count` needs: (rows or None for all, where in the output table, slots)
        self._pending: tuple | None = None

    @property
    def capacity(self) -> int:
        """Sequences the tables hold rows for."""
        return self._capacity

    def release(self, seq_ids) -> None:
        """Drop the state of sequences that ended (unknown ids are ignored)."""
        for seq_id in seq_ids:
            slot = self.slots.pop(seq_id, None)
            if slot is not None:
                self._free.append(slot)

    def apply(self, scores: torch.Tensor, params: list[dict]) -> torch.Tensor:
        """`scores`, or a float32 copy with the rows that carry "seq" biased and penalised.
        Call `count` with the tokens drawn from it before the next `apply`."""
        self._pending = None
        rows = [i for i, p in enumerate(params) if "seq" in p]
        if len(rows) < len(params) and any("seq" not in p and "bias_ids" in p for p in params):
            raise ValueError("a row with a logit_bias must carry its sequence id (seq)")
        if not rows:
            return scores
        batch, vocab = scores.shape
        chosen = params if len(rows) == batch else [params[i] for i in rows]
        for p in chosen:
            if "history" in p:
                self._start(p, vocab)
            elif "bias_ids" in p:
                raise ValueError("logit_bias comes on a row with its history (step.py)")
        slots = self._slots_of(chosen)
        positions = self._lengths["output"][slots]  # where each row's next token goes
        self._fit("output", int(positions.max()) + 1)  # room for this step's token
        flat = slots * self._tables["output"].shape[1] + positions
        kind = int(np.bitwise_or.reduce(self._kinds[slots]))
        kernels = self._kernels or triton_kernels_for("penalty_kernels", ENV_SWITCH, scores)
        at = (np.asarray(rows), slots, positions, flat)
        if kernels is None:
            return self._eager(scores, *at, kind)
        return self._fused(kernels, scores, *at, kind)

    def count(self, token_ids: torch.Tensor) -> None:
        """Append the tokens drawn for the rows of the last `apply` to their outputs (on the
        device)."""
        if self._pending is None:
            return
        rows, flat, slots = self._pending
        self._pending = None
        drawn = token_ids if rows is None else token_ids.index_select(0, rows)
        self._tables["output"].view(-1).index_copy_(0, flat, drawn)
        np.add.at(self._lengths["output"], slots, 1)

    def _slots_of(self, params: list[dict]) -> np.ndarray:
        slots_of = self.slots
        try:
            return np.fromiter((slots_of[p["seq"]] for p in params), np.int64, len(params))
        except KeyError as missing:
            raise ValueError(
                f"no tokens kept for sequence {missing.args[0]}: its first step after a "
                "(re)start must carry its history"
            ) from None

    def _fused(self, kernels, scores, rows, slots, positions, flat, kind: int) -> torch.Tensor:
        """The float32 copy and every rule in one kernel (energon/kernels/penalty_kernels.py).
        `rows`, `slots`, `positions` (output lengths) and `flat` as `apply` works them out."""
        batch, n = scores.shape[0], len(slots)
        per_row = np.zeros((4, batch), np.int64)  # slot (-1: none), output, prompt, bias lengths
        per_row[0] = -1
        per_row[0, rows] = slots
        per_row[1, rows] = positions
        per_row[2, rows] = self._lengths["prompt"][slots]
        per_row[3, rows] = self._lengths["bias_ids"][slots]
        index = to_device(np.concatenate([per_row.ravel(), rows, flat]), torch.int64, scores.device)
        whole = n == batch  # every row, in order
        self._pending = (None if whole else index[4 * batch : 4 * batch + n], index[-n:], slots)
        tables = self._tables
        return kernels.penalise(
            scores, index[: 4 * batch], tables["output"], tables["prompt"], tables["bias_ids"],
            tables["bias_values"], tables["rules"], bias=bool(kind & _BIAS),
            repetition=bool(kind & _REPETITION), frequency=bool(kind & _FREQUENCY),
            presence=bool(kind & _PRESENCE),
        )  # fmt: skip

    def _eager(self, scores, rows, slots, positions, flat, kind: int) -> torch.Tensor:
        """The float32 copy and the rules as torch ops (arguments as `_fused`'s)."""
        batch, vocab = scores.shape
        n = len(slots)
        index = to_device(np.concatenate([rows, slots, flat]), torch.int64, scores.device)
        rows_t, slots_t = index[:n], index[n : 2 * n]
        whole = n == batch  # every row, in order (rows ascend)
        self._pending = (None if whole else rows_t, index[2 * n :], slots)
        # one scratch column that the pads point at
        x = torch.empty((batch, vocab + 1), dtype=torch.float32, device=scores.device)
        x[:, :vocab].copy_(scores)
        xr = x if whole else x.index_select(0, rows_t)
        rules = self._tables["rules"].index_select(0, slots_t)  # [n, 3]: r, f, p
        if kind & _BIAS:
            width = int(self._lengths["bias_ids"][slots].max())
            ids = self._tables["bias_ids"].index_select(0, slots_t)[:, :width]
            values = self._tables["bias_values"].index_select(0, slots_t)[:, :width]
            xr.scatter_add_(1, ids, values)
        output_len = int(positions.max())
        output = self._tables["output"].index_select(0, slots_t)[:, :output_len]
        if kind & _REPETITION:
            seen = output
            prompt_len = int(self._lengths["prompt"][slots].max())
            if prompt_len:
                prompt = self._tables["prompt"].index_select(0, slots_t)[:, :prompt_len]
                seen = torch.cat([prompt, output], dim=1)
            if seen.shape[1]:
                r = rules[:, 0:1]
                logit = xr.gather(1, seen)
                xr.scatter_(1, seen, torch.where(logit < 0, logit * r, logit / r))
        if output_len and kind & _FREQUENCY:
            xr.scatter_add_(1, output, rules[:, 1:2].neg().expand(n, output_len))
        if output_len and kind & _PRESENCE:
            xr.scatter_(1, output, xr.gather(1, output) - rules[:, 2:3])
        if not whole:
            x.index_copy_(0, rows_t, xr)
        return x[:, :vocab]

    def _start(self, p: dict, vocab: int) -> None:
        """(Re)start a sequence from its history, prompt, bias and rules."""
        if self._vocab != vocab:
            if self.slots:
                raise ValueError(f"logits of {vocab} columns where the tables have another width")
            self._vocab = vocab
            self._tables = {}
            self._capacity = 0
            self._free = []
            self._lengths = {name: _EMPTY for name in self._lengths}
            self._kinds = _EMPTY
        slot = self.slots.get(p["seq"])
        if slot is None:
            slot = self._allocate()
            self.slots[p["seq"]] = slot

        def ids(tokens) -> list[int]:
            return [t if 0 <= t < vocab else vocab for t in tokens]

        bias = list(p.get("bias_values", ()))
        rules = [
            float(p.get("repetition_penalty", 1.0)),
            float(p.get("frequency_penalty", 0.0)),
            float(p.get("presence_penalty", 0.0)),
        ]
        self._write("output", slot, ids(p["history"]), room=1)  # and this step's token
        self._write("prompt", slot, ids(p.get("prompt", ())))
        self._write("bias_ids", slot, ids(p.get("bias_ids", ())))
        self._write("bias_values", slot, bias)
        self._write("rules", slot, rules)
        self._kinds[slot] = (
            (_REPETITION if rules[0] != 1.0 else 0)
            | (_FREQUENCY if rules[1] else 0)
            | (_PRESENCE if rules[2] else 0)
            | (_BIAS if bias else 0)
        )

    def _pad(self, table: str):
        return 0.0 if table in _FLOAT_TABLES else self._vocab

    def _write(self, table: str, slot: int, values: list, room: int = 0) -> None:
        """Row `slot` of a table: `values`, then pads; its length, where one is kept."""
        self._fit(table, len(values) + room)
        row = self._tables[table][slot]
        row.fill_(self._pad(table))
        if values:
            row[: len(values)].copy_(to_device(values, row.dtype, self.device))
        if table in self._lengths:
            self._lengths[table][slot] = len(values)

    def _fit(self, table: str, width: int) -> None:
        """A table at least `width` wide (doubling)."""
        old = self._tables.get(table)
        have = 0 if old is None else old.shape[1]
        if old is not None and width <= have:
            return
        grown = self._new(table, self._capacity, max(width, 2 * have, 16))
        if old is not None:
            grown[:, :have] = old
        self._tables[table] = grown

    def _new(self, table: str, rows: int, width: int) -> torch.Tensor:
        floats = table in _FLOAT_TABLES
        dtype = torch.float32 if floats else torch.int64
        return torch.full((rows, width), self._pad(table), dtype=dtype, device=self.device)

    def _allocate(self) -> int:
        if not self._free:  # full: double the tables
            used, grown = self._capacity, max(8, 2 * self._capacity)
            for table, old in self._tables.items():
                wide = self._new(table, grown, old.shape[1])
                wide[:used] = old
                self._tables[table] = wide
            room = np.zeros(grown - used, np.int64)
            for name, lengths in self._lengths.items():
                self._lengths[name] = np.concatenate([lengths, room])
            self._kinds = np.concatenate([self._kinds, room])
            self._capacity = grown
            self._free.extend(range(grown - 1, used - 1, -1))
        return self._free.pop()
