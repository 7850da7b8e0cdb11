"""Run a model family in this process (tp=1, pp=1) next to its Hugging Face reference (tests only).

The reference is `transformers` run on each sequence alone (no padding, no batching effects);
Energon runs the same sequences packed into one batch, optionally through a paged KV cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from energon.models.loader import load_weights
from energon.models.registry import resolve
from energon.parallel.attention import Attention
from energon.parallel.packing import BatchMeta, pack
from energon.parallel.topology import ParallelState


def save_random_checkpoint(hf_model, folder: Path, std: float = 0.2, seed: int = 0) -> None:
    """Give every parameter (biases and norms too, which HF initialises to 0/1) random values, so a
    misplaced bias or norm changes the logits; save as a safetensors checkpoint in `folder`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * std)
    hf_model.eval().save_pretrained(folder)


def build(folder: Path):
    """The Energon model of the checkpoint in `folder`, on CPU in float32, weights loaded."""
    spec = resolve(folder)
    model = spec.model_class(spec.config)
    load_weights(model, folder, ParallelState())
    return model.eval()


def run(model, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
    """The whole model (embed, layers, head): logits of `meta.logits_indices` rows (all when None)."""
    with torch.no_grad():
        return model(input_ids, meta)


def hf_logits(hf_model, seqs: list[list[int]]) -> torch.Tensor:
    """Hugging Face logits of each sequence run alone, packed: [sum of lengths, vocab]."""
    with torch.no_grad():
        return torch.cat([hf_model(torch.tensor([s])).logits[0] for s in seqs])


def energon_logits(model, seqs: list[list[int]]) -> torch.Tensor:
    """Energon logits of all sequences in one packed batch, no cache: [sum of lengths, vocab]."""
    input_ids, meta = pack(seqs)
    return run(model, input_ids, meta)


def cached_logits(
    model, prompts: list[list[int]], continuations: list[list[int]], block_size: int = 4
) -> torch.Tensor:
    """Prefill `prompts` into a paged KV cache, then feed `continuations` one token per step.

    Returns the logits of each prompt's last token, then of every decoded token, in the packed
    order of the full sequences minus their first len(prompt)-1 tokens: [sum of (1 + len(cont)), V].
    Every sequence decodes in the same steps (equal continuation lengths required).
    """
    steps = {len(c) for c in continuations}
    assert len(steps) == 1, "continuations must have equal lengths"
    (steps,) = steps
    totals = [len(p) + steps for p in prompts]
    per_seq = max(-(-n // block_size) for n in totals)
    # Sequence b owns blocks b, b+B, b+2B, ...: interleaved, so a wrong block table shows.
    num_seqs = len(prompts)
    tables = [[b + i * num_seqs for i in range(per_seq)] for b in range(num_seqs)]
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        shape = (2, per_seq * num_seqs, block_size, attn.num_kv_heads, attn.head_dim)
        attn.kv_cache = torch.zeros(shape)

    rows = [[] for _ in prompts]
    lens = [len(p) for p in prompts]
    meta = BatchMeta.for_step(lens, lens, tables, block_size, logits_indices="last")
    out = run(model, torch.tensor([t for p in prompts for t in p]), meta)
    for b in range(num_seqs):
        rows[b].append(out[b])
    for step in range(steps):
        context = [n + step + 1 for n in lens]
        meta = BatchMeta.for_step([1] * num_seqs, context, tables, block_size, "last")
        out = run(model, torch.tensor([c[step] for c in continuations]), meta)
        for b in range(num_seqs):
            rows[b].append(out[b])
    for attn in (m for m in model.modules() if isinstance(m, Attention)):
        attn.kv_cache = None
    return torch.stack([r for seq_rows in rows for r in seq_rows])


def hf_rows_from(hf_model, prompts, continuations) -> torch.Tensor:
    """HF full-forward logits of each prompt's last token and every continuation token."""
    rows = []
    with torch.no_grad():
        for p, c in zip(prompts, continuations, strict=True):
            logits = hf_model(torch.tensor([p + c])).logits[0]
            rows.append(logits[len(p) - 1 :])
    return torch.cat(rows)
