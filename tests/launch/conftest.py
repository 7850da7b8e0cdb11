"""The reference every launcher test compares with: the one-host run."""

from __future__ import annotations

import asyncio

import pytest
import torch
from launch_helpers import NEW_TOKENS, PP, PROMPTS, TP, generate_all, make_llama

from energon import Engine


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """(checkpoint folder, HF model) of a tiny random Llama without a tokenizer."""
    folder = tmp_path_factory.mktemp("launch-llama")
    return folder, make_llama(folder)


async def _local_run(folder) -> list[list[int]]:
    async with Engine(str(folder), tp=TP, pp=PP, device="cpu", progress=False) as engine:
        return await generate_all(engine)


@pytest.fixture(scope="session")
def one_host(llama) -> list[list[int]]:
    """Greedy tokens of PROMPTS from launcher="local" at tp=TP, pp=PP (its own event loop),
    checked against Hugging Face `generate` of each prompt alone, every token (this seeded
    model has no near-tie on these prompts)."""
    folder, hf = llama
    tokens = asyncio.run(_local_run(folder))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for prompt, n, got in zip(PROMPTS, NEW_TOKENS, tokens, strict=True):
                out = hf.generate(
                    torch.tensor([prompt]),
                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                assert got == out[0, len(prompt) :].tolist()
    finally:
        torch.set_num_threads(before)
    return tokens
