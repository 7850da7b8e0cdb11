"""Shared helpers of the model tests: random HF checkpoints per family, runner groups per layout,
and Hugging Face reference logits (each sequence run alone, no padding).

CHECKPOINT_MAKERS is the family table of the parity suite: name → maker(folder) that saves a tiny
random checkpoint there and returns the Hugging Face model it came from (in eval mode).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch

from energon.actors.transport import free_port

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
VOCAB = 128


def randomize(hf_model, std: float = 0.1, seed: int = 0):
    """Random values for every parameter, biases and norms included (HF sets those to 0/1, which
    would hide a misplaced bias or norm); returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in hf_model.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * std)
    return hf_model.eval()


def make_llama(folder: Path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY, "vocab_size": VOCAB, "num_key_value_heads": 4, **overrides})
    hf = randomize(LlamaForCausalLM(config))
    hf.save_pretrained(folder)
    return hf


def make_mistral(folder: Path, **overrides):
    """GQA (4 query heads, 2 kv heads), no biases, untied embeddings."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{**TINY, "vocab_size": VOCAB, "num_key_value_heads": 2, **overrides})
    hf = randomize(MistralForCausalLM(config), seed=1)
    hf.save_pretrained(folder)
    return hf


def make_qwen2(folder: Path, **overrides):
    """q/k/v biases, GQA, tied embeddings."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **{**TINY, "vocab_size": VOCAB, "num_key_value_heads": 2, "tie_word_embeddings": True}
        | overrides
    )
    hf = randomize(Qwen2ForCausalLM(config), seed=2)
    hf.save_pretrained(folder)
    return hf


def make_gpt2(folder: Path, **overrides):
    """Conv1D weights ([in, out]), fused c_attn, learned positions, tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        **{"n_embd": 64, "n_layer": 3, "n_head": 4, "n_positions": 64, "vocab_size": VOCAB}
        | overrides
    )
    hf = randomize(GPT2LMHeadModel(config), seed=3)
    hf.save_pretrained(folder)
    return hf


def _opt(folder: Path, seed: int, **overrides):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        **{
            "hidden_size": 64,
            "ffn_dim": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "vocab_size": VOCAB,
        }
        | overrides
    )
    hf = randomize(OPTForCausalLM(config), seed=seed)
    hf.save_pretrained(folder)
    return hf


def make_opt(folder: Path, **overrides):
    """Pre-LN OPT (125m, 1.3b, ..., 175b): learned positions offset by 2, ReLU, tied lm_head."""
    return _opt(folder, 4, **overrides)


def make_opt_350m(folder: Path, **overrides):
    """OPT-350m's shape: post-LN, no final norm, word_embed_proj_dim != hidden (project_in/out)."""
    return _opt(folder, 5, **{"do_layer_norm_before": False, "word_embed_proj_dim": 32} | overrides)


def make_bloom(folder: Path, **overrides):
    """ALiBi with 6 heads (not a power of 2; 3 per rank at tp=2), fused per-head qkv, tied lm_head."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(
        **{"hidden_size": 48, "n_layer": 3, "n_head": 6, "vocab_size": VOCAB} | overrides
    )
    hf = randomize(BloomForCausalLM(config), seed=6)
    hf.save_pretrained(folder)
    return hf


CHECKPOINT_MAKERS = {
    "llama": make_llama,
    "mistral": make_mistral,
    "qwen2": make_qwen2,
    "gpt2": make_gpt2,
    "opt": make_opt,
    "opt_350m": make_opt_350m,
    "bloom": make_bloom,
}

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def hf_logits(hf_model, seqs: list[list[int]]) -> torch.Tensor:
    """Hugging Face logits of each sequence run alone, packed: float32 [sum of lengths, vocab]."""
    with torch.no_grad():
        return torch.cat([hf_model(torch.tensor([s])).logits[0].float() for s in seqs])


class RunnerGroup:
    """An ActorGroup driven from synchronous tests: its event loop runs on a private thread."""

    def __init__(self, actor: str, world_size: int, kwargs: dict, timeout: float = 120.0):
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        from energon.actors import ActorGroup

        self.group = self._wait(
            lambda: ActorGroup.spawn(actor, world_size, kwargs=kwargs, heartbeat_timeout=30.0)
        )

    def _wait(self, start):
        """Run start() -> awaitable ON the loop's thread (zmq sockets and futures are not
        thread-safe) and block this thread for its result, at most `timeout` seconds."""

        async def bounded():
            return await asyncio.wait_for(start(), self.timeout)

        return asyncio.run_coroutine_threadsafe(bounded(), self.loop).result()

    def broadcast(self, method: str, *args) -> list:
        """method(*args) on every rank; the results in rank order."""
        return self._wait(lambda: self.group.broadcast(method, *args))

    def close(self) -> None:
        try:
            self._wait(self.group.shutdown)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict:
    """family → (folder, hf_model) for every family in CHECKPOINT_MAKERS."""
    out = {}
    for family, maker in CHECKPOINT_MAKERS.items():
        folder = tmp_path_factory.mktemp(family)
        out[family] = (folder, maker(folder))
    return out


@pytest.fixture(scope="module", params=LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def runner_set(request, checkpoints):
    """(tp, pp, group) where each rank hosts one ModelRunner per family (tests/models/runner_set.py)."""
    tp, pp = request.param
    models = {family: str(folder) for family, (folder, _) in checkpoints.items()}
    kwargs = dict(models=models, tp=tp, pp=pp, init_method=f"tcp://127.0.0.1:{free_port()}")
    group = RunnerGroup("runner_set:RunnerSet", tp * pp, kwargs)
    yield tp, pp, group
    group.close()


def static_graph_group(folder) -> RunnerGroup:
    """Four ModelRunners of the checkpoint in `folder` at tp=2, pp=2, their step graphs on the
    static path (cpu): later stages receive into the static buffers, tp ranks all-reduce pads."""
    kwargs = dict(
        model=str(folder),
        tp=2,
        pp=2,
        init_method=f"tcp://127.0.0.1:{free_port()}",
        decode_graphs="static",
    )
    return RunnerGroup("energon.runner:ModelRunner", 4, kwargs)
