"""Turn the last stage's logits into token ids, on the worker.

Order of operations, as in Hugging Face `generate`: temperature, then top-k, then top-p on the
top-k survivors renormalised, then min-p (a token stays if its probability is at least min_p
times the most likely one's; vLLM applies it before top-k and top-p, which differs only when
min_p and top_p are combined), then a draw. The draw is Gumbel-max: argmax(x - log E) with
E ~ Exp(1) per vocabulary entry, which picks token i with probability softmax(x)_i and lets each
row take its noise from its own generator:

- a request with a seed draws its noise at generation step n from a generator seeded by
  `mix_seed(seed, n)`, so its tokens do not depend on its batch mates or its row;
- requests without one share the worker's generator (seed it alike on every rank that samples).

Greedy rows (temperature below 1e-5, or top_k 1) are one batched argmax, with no host sync, over
the logits as they come (float16 too: widening is exact and keeps the order, so the token is the
same); only the rows drawn are copied to float32.
Logprobs are those of the raw model distribution, log_softmax(logits) computed in float64, as
vLLM reports them: not the temperature-scaled or truncated distribution the token was drawn from.
A row whose params carry "banned" ids and "min_tokens" (SamplingParams.min_tokens; the
controller's Request adds them) cannot draw those ids before it has generated min_tokens tokens:
they are set to -inf in a copy of the logits, only on steps where some row needs it.
Logit bias and the repetition, frequency and presence penalties come next
(energon/penalties.py, which keeps those sequences' token ids on this rank); the token is drawn
from what they leave.
"""

from __future__ import annotations

import torch

from energon.host_copy import to_device
from energon.penalties import Penalties
from energon.sampling import RowFeature, drawn, step_features

_GOLDEN = 0x9E3779B97F4A7C15  # odd: 2**64 / golden ratio
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(seed: int, step: int) -> int:
    """The generator seed for a request's draw at generation step `step`, in [0, 2**63)."""
    return _splitmix64((seed + _GOLDEN * step) & _MASK64) >> 1


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Set to -inf, in place, the logits that top-k and then top-p remove; returns `logits`.

    `top_k` int64 [B] (0 = off) keeps tokens whose logit is >= the k-th largest (ties with it are
    kept). `top_p` float [B] (1 = off) then keeps, of the top-k survivors renormalised, the
    smallest most-likely-first set whose probability reaches top_p; the most likely token is
    always kept.
    """
    vocab = logits.shape[-1]
    k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    p = torch.where(top_p >= 1.0, float("inf"), top_p.to(torch.float32))
    return _top_k_top_p(logits, k, p)


def _top_k_top_p(logits, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """apply_top_k_top_p with k in [1, vocab] (vocab: off) and p in (0, 1) or inf (off), each
    None when no row has it on (its ops are left out)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    remove = None
    kept = sorted_logits
    if k is not None:
        kth = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))
        remove = sorted_logits < kth
        kept = sorted_logits.masked_fill(remove, float("-inf"))
    if p is not None:
        probs = kept.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
        outside = before >= p.to(probs.dtype).unsqueeze(-1)
        remove = outside if remove is None else remove.logical_or_(outside)
        remove[:, 0] = False

    remove_in_vocab_order = torch.empty_like(remove).scatter_(-1, order, remove)
    return logits.masked_fill_(remove_in_vocab_order, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf, in place, the logits whose probability is below min_p [B] (0 = off) times
    their row's largest; returns `logits`. The most likely token always stays."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.to(probs.dtype).unsqueeze(-1)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def _ban(logits: torch.Tensor, params: list[dict], steps: list[int]) -> torch.Tensor:
    """`logits`, or a copy with each row's "banned" ids at -inf while the row has generated
    fewer than its "min_tokens" tokens."""
    vocab = logits.shape[-1]
    flat = [
        i * vocab + t
        for i, p in enumerate(params)
        if steps[i] < p.get("min_tokens", 0)
        for t in p["banned"]
        if t < vocab
    ]
    if not flat:
        return logits
    scores = logits.clone(memory_format=torch.contiguous_format)  # view(-1) needs it
    # index_fill_ takes a Python scalar: no host sync, unlike index_put_
    scores.view(-1).index_fill_(0, to_device(flat, torch.int64, logits.device), float("-inf"))
    return scores


class Sampler:
    """Samples one token per row of a logits batch; see the module docstring for the rules.

    `seed` seeds the worker's generator for requests without a seed (random when None).
    """

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None):
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._seeded = torch.Generator(self.device)  # reseeded for every seeded row
        self.penalties = Penalties(self.device)

    def release(self, seq_ids) -> None:
        """Forget what is kept for sequences that ended (a step's "release")."""
        self.penalties.release(seq_ids)

    @torch.no_grad()
    def sample(
        self,
        logits: torch.Tensor,
        params: list[dict],
        steps: list[int],
        features: int | None = None,
    ) -> tuple[torch.Tensor, list[dict | None] | None]:
        """Returns (token ids int64 [B] on the logits' device, logprobs).

        `params[i]` is `SamplingParams.to_wire()` of row i's request and `steps[i]` how many
        tokens it has generated before this one; `features` the rows' RowFeatures ORed (worked
        out from params when None). logprobs is None when no row asked for them, else a list
        with, per row, None or {"token_id", "logprob", "top_ids", "top_logprobs"}.
        """
        batch = logits.shape[0]
        if len(params) != batch or len(steps) != batch:
            raise ValueError(
                f"need one params dict and one step per logits row: {batch} rows, "
                f"{len(params)} params, {len(steps)} steps"
            )
        features = step_features(params, features)
        scores = logits
        if features & RowFeature.BANNED:
            scores = _ban(scores, params, steps)
        if features & RowFeature.STATEFUL:
            scores = self.penalties.apply(scores, params)
        rows = []
        if features & RowFeature.DRAWN:
            rows = [i for i, p in enumerate(params) if drawn(p)]
        if not rows:
            token_ids = scores.argmax(dim=-1)
        elif len(rows) == batch:
            token_ids = self._draw(scores, params, steps, None)
        else:
            index = to_device(rows, torch.int64, logits.device)
            picked = self._draw(scores, [params[i] for i in rows], [steps[i] for i in rows], index)
            token_ids = scores.argmax(dim=-1)
            token_ids.index_copy_(0, index, picked)
        if features & RowFeature.STATEFUL:
            self.penalties.count(token_ids)
        if not features & RowFeature.LOGPROBS:
            return token_ids, None
        return token_ids, self._logprobs(logits, token_ids, params)

    def _draw(self, logits, params, steps, index) -> torch.Tensor:
        """Token ids for the rows `index` (a device tensor, or None for all) of logits, which are
        not greedy; `params` and `steps` are those rows'."""
        device = logits.device
        if index is None:
            x = logits.to(torch.float32, copy=True)  # scaled and masked in place below
        else:
            x = logits.index_select(0, index).float()
        # every row's temperature, top_k, top_p and min_p in one copy to the device
        vocab = x.shape[-1]
        temperature, top_k, top_p, min_p = [], [], [], []
        any_k = any_p = any_min_p = False
        for p in params:
            temperature.append(float(p["temperature"]))
            k, q, m = int(p["top_k"]), float(p["top_p"]), float(p.get("min_p", 0.0))
            if 0 < k < vocab:
                any_k = True
            else:
                k = vocab  # off
            if q < 1.0:
                any_p = True
            else:
                q = float("inf")  # off
            any_min_p = any_min_p or m > 0.0
            top_k.append(float(k))  # exact in float32 below 2**24
            top_p.append(q)
            min_p.append(m)
        table = to_device(temperature + top_k + top_p + min_p, torch.float32, device)
        table = table.view(4, len(params))
        x.div_(table[0].unsqueeze(-1))
        if any_k or any_p:
            _top_k_top_p(x, table[1].long() if any_k else None, table[2] if any_p else None)
        if any_min_p:
            apply_min_p(x, table[3])

        noise = torch.empty_like(x)
        unseeded = [j for j, p in enumerate(params) if p["seed"] is None]
        if len(unseeded) == len(params):
            noise.exponential_(generator=self.generator)
        elif unseeded:
            shared = torch.empty((len(unseeded), x.shape[1]), device=device)
            shared.exponential_(generator=self.generator)
            noise[to_device(unseeded, torch.int64, device)] = shared
        for j, p in enumerate(params):
            if p["seed"] is not None:
                self._seeded.manual_seed(mix_seed(int(p["seed"]), int(steps[j])))
                noise[j].exponential_(generator=self._seeded)
        # Exp(1) can round to 0: clamp so log() stays finite and -inf logits stay -inf.
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (x - noise.log_()).argmax(dim=-1)

    def _logprobs(self, logits, token_ids, params) -> list[dict | None] | None:
        wanted = [int(p["logprobs"]) for p in params]
        rows = [i for i, k in enumerate(wanted) if k > 0]
        if not rows:
            return None
        index = to_device(rows, torch.int64, logits.device)
        found = logprob_rows(
            logits.index_select(0, index),
            token_ids.index_select(0, index),
            [wanted[i] for i in rows],
        )
        out: list[dict | None] = [None] * len(params)
        for i, row in zip(rows, found, strict=True):
            out[i] = row
        return out


def logprob_rows(logits: torch.Tensor, token_ids: torch.Tensor, top: list[int]) -> list[dict]:
    """Per row i of `logits`: {"token_id", "logprob", "top_ids", "top_logprobs"} with the log
    probability (log_softmax in float64) of token_ids[i] and the top[i] most likely tokens with
    theirs. One host sync for all the rows."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    chosen = logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    top_values, top_ids = logprobs.topk(max(top, default=0), dim=-1)
    chosen_ids, chosen = token_ids.tolist(), chosen.tolist()
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        {
            "token_id": chosen_ids[j],
            "logprob": chosen[j],
            "top_ids": top_ids[j][:k],
            "top_logprobs": top_values[j][:k],
        }
        for j, k in enumerate(top)
    ]
