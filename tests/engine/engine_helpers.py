"""Shared pieces of the Engine tests: tiny random HF checkpoints (the makers of
tests/models/conftest.py), a trained BPE tokenizer for text, and Hugging Face references.

References are computed per prompt, alone, in float32 with `transformers`: greedy tokens with
`generate(do_sample=False)` and, for each generated token, the gap between the two largest logits,
so a test can assert that no comparison rests on a near-tie (where float32 rounding could flip
the argmax).
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import random
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

# tests/models/conftest.py is not importable as `conftest` from here (another directory's
# conftest would clash), so it is loaded under its own name.
_spec = importlib.util.spec_from_file_location(
    "models_conftest", Path(__file__).parents[1] / "models" / "conftest.py"
)
models_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models_conftest)
CHECKPOINT_MAKERS = models_conftest.CHECKPOINT_MAKERS
LAYOUTS = models_conftest.LAYOUTS
make_llama = models_conftest.make_llama

# A greedy token is compared only where HF's top-2 logit gap exceeds this: Energon's logits
# differ from HF's by ~1e-7 on these models (1e-4 is what tests/models/test_parity.py bounds),
# and the random models' logits have a spread of ~0.08, so a gap below 1e-5 is a near-tie.
MIN_MARGIN = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """HF references in this process run on one intra-op thread while the Engine's workers
    compute beside it: tiny models gain nothing from more, and on a 2-core box threads that
    oversubscribe the cores make everything many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def workers() -> set:
    """This process's live Engine worker processes (launcher="local")."""
    return {p for p in multiprocessing.active_children() if p.name.startswith("energon-worker")}


CORPUS = [
    "the cat sat on the mat",
    "the dog sat on the log",
    "naive cats and dogs",
    "once upon a time there was a tiny model",
] * 20


def train_bpe(vocab_multiple: int = 4, corpus: list[str] = CORPUS) -> RustTokenizer:
    """A byte-level BPE trained on corpus; <s>=0, </s>=1, padded with unused specials to a
    multiple of `vocab_multiple` (so tp=2/4 divide the model's vocabulary; 1: no padding)."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    size = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<unused{i}>" for i in range(-size % vocab_multiple)])
    return tok


def make_text_llama(folder: Path):
    """A tiny random Llama whose folder also holds a BPE tokenizer.json (bos 0, eos 1);
    returns (hf_model, tokenizer)."""
    tok = train_bpe()
    vocab = tok.get_vocab_size(with_added_tokens=True)
    hf = make_llama(folder, vocab_size=vocab, bos_token_id=0, eos_token_id=1)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return hf, tok


@dataclass
class Reference:
    """HF greedy continuation of one prompt: tokens and, per token, the top-2 logit gap."""

    tokens: list[int]
    margins: list[float]


def hf_greedy(hf, prompt: list[int], max_new_tokens: int, eos: bool = False) -> Reference:
    """HF `generate(do_sample=False)` of `prompt` alone, float32; `eos` False disables EOS."""
    kwargs = {} if eos else {"eos_token_id": None}
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            **kwargs,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    margins = []
    for logits in out.logits:
        top2 = logits[0].float().topk(2).values
        margins.append(float(top2[0] - top2[1]))
    return Reference(tokens, margins[: len(tokens)])


def hf_logits_of(hf, ids: list[int]) -> torch.Tensor:
    """Float32 logits [len(ids), vocab] of one sequence run alone."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def random_prompts(n: int, vocab: int, seed: int, lengths=(1, 40), new=(1, 24)):
    """n (prompt, max_tokens) pairs of mixed lengths, reproducible from seed."""
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(2, vocab) for _ in range(rng.randint(*lengths))],
            rng.randint(*new),
        )
        for _ in range(n)
    ]


def comparable(ref: Reference) -> int:
    """How many leading reference tokens are clear argmaxes: up to the first near-tie, after
    which a different (equally right) token would send the two continuations apart."""
    for i, margin in enumerate(ref.margins):
        if margin <= MIN_MARGIN:
            return i
    return len(ref.tokens)


def assert_greedy_equal(got: list[int], ref: Reference) -> int:
    """`got` equals the reference token for token (all of it, or up to its first near-tie);
    returns how many tokens were compared."""
    k = comparable(ref)
    # all of it: no token past the reference either; else up to the near-tie
    have, want = (got, ref.tokens) if k == len(ref.tokens) else (got[:k], ref.tokens[:k])
    if have != want:
        at = next(
            (i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b),
            min(len(have), len(want)),
        )
        raise AssertionError(
            f"greedy tokens part from HF's at token {at} of {len(want)} compared "
            f"(HF's top-2 logit gap there {ref.margins[at] if at < len(ref.margins) else None!r}, "
            f"smallest before it {min(ref.margins[:at], default=None)!r}): got {got}, HF {ref.tokens}"
        )
    return k


def reference_sample(hf, prompt: list[int], params) -> list[int]:
    """What a seeded request must generate: at step n, HF's logits of the tokens so far, drawn
    from with `energon.sampler.Sampler` (the worker's sampler) for step n. `params` must have a
    seed and ignore_eos (the reference knows no EOS)."""
    from energon.sampler import Sampler

    assert params.seed is not None and params.ignore_eos
    sampler = Sampler("cpu", seed=12345)  # seeded rows never touch the shared generator
    draw = neutral(params).to_wire()  # bias and penalties: HF's processors, below
    tokens: list[int] = []
    for n in range(params.max_tokens):
        logits = processed_logits(hf, prompt, tokens, params)
        token, _ = sampler.sample(logits, [draw], [n])
        tokens.append(int(token[0]))
    return tokens


def neutral(params):
    """`params` without logit bias or penalties."""
    return replace(
        params, logit_bias=(), presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0
    )


def processed_logits(hf, prompt: list[int], tokens: list[int], params) -> torch.Tensor:
    """HF's float32 logits [1, vocab] for the token after prompt + tokens, with `params`'
    logit_bias (HF's SequenceBiasLogitsProcessor), repetition penalty (HF's
    RepetitionPenaltyLogitsProcessor, over prompt and output) and OpenAI's frequency and
    presence penalties (HF has none: counted here in float64 over the output), in that order."""
    from transformers import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    ids = torch.tensor([prompt + tokens])
    scores = hf_logits_of(hf, prompt + tokens)[-1:]
    if params.logit_bias:
        bias = [[[t], b] for t, b in params.logit_bias]
        scores = SequenceBiasLogitsProcessor(sequence_bias=bias)(ids, scores)
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(ids, scores)
    if tokens and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(tokens), minlength=scores.shape[-1]).double()
        change = params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        scores = (scores.double() - change).float()
    return scores


def hf_processed_greedy(hf, prompt: list[int], params) -> Reference:
    """Greedy tokens of `processed_logits` for params.max_tokens steps (no EOS), with the gap
    between the two largest processed logits at each."""
    tokens: list[int] = []
    margins: list[float] = []
    for _ in range(params.max_tokens):
        top2 = processed_logits(hf, prompt, tokens, params)[0].topk(2)
        tokens.append(int(top2.indices[0]))
        margins.append(float(top2.values[0] - top2.values[1]))
    return Reference(tokens, margins)
