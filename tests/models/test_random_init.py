"""Random weights of presets are one model under every (tp, pp) layout.

`random_init` draws each value from (seed, checkpoint tensor name, index in the full tensor), so
the shards a rank builds are exact slices of the tp=1 tensors, and the whole model computes the
same logits at tp=2 as at tp=1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import RunnerGroup, free_port

from energon.models import loader
from energon.models.loader import hashed_normal, random_init
from energon.models.registry import ModelSpec, resolve
from energon.parallel.topology import ParallelState, Topology
from energon.runner import ModelRunner, build_stage

SEQS = [[256, 72, 101, 108, 108, 111], [256, 7, 9], [256, 33, 34, 35, 36, 37, 38, 39, 40, 41]]


def stage_params(spec: ModelSpec, tp: int, pp: int, seed: int = 0) -> list[dict]:
    """Every rank's {name: parameter} of `spec` at (tp, pp), built in this process on cpu."""
    out = []
    for rank in range(tp * pp):
        state = ParallelState(Topology(tp, pp), rank, None, torch.device("cpu"))
        model, _ = build_stage(spec, state, torch.float32)
        random_init(model, seed)
        out.append(dict(model.named_parameters()))
    return out


def reassembled(ranks: list[dict], topo: Topology, name: str) -> torch.Tensor:
    """The full tensor `name` put back together from the stage that holds it (tp shards
    concatenated along shard_dim); replicated copies must agree."""
    (stage,) = {topo.stage_of(r) for r, params in enumerate(ranks) if name in params}
    shards = [ranks[topo.rank_of(stage, t)][name] for t in range(topo.tp)]
    dim = getattr(shards[0], "shard_dim", None)
    if dim is None:
        for s in shards[1:]:
            assert torch.equal(s, shards[0]), f"{name} differs between tp ranks"
        return shards[0]
    return torch.cat(shards, dim)


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (2, 2)])
def test_tiny_shards_reassemble_to_the_tp1_tensors_exactly(tp, pp):
    spec = resolve("tiny")
    (full,) = stage_params(spec, 1, 1)
    ranks = stage_params(spec, tp, pp)
    names = set().union(*ranks)
    assert names == set(full)
    for name, tensor in full.items():
        assert torch.equal(reassembled(ranks, Topology(tp, pp), name), tensor), name


def small_opt() -> ModelSpec:
    """opt-125m's config shrunk to a few thousand parameters (tied embeddings, biases)."""
    config = copy.deepcopy(resolve("opt-125m").config)
    config.update(hidden_size=32, word_embed_proj_dim=32, ffn_dim=64, num_hidden_layers=2)
    config.update(num_attention_heads=4, vocab_size=64, max_position_embeddings=16)
    return ModelSpec("small-opt", config, "OPTForCausalLM", resolve("opt-125m").family, None)


def test_tied_head_on_the_last_stage_equals_the_embedding():
    spec = small_opt()
    (full,) = stage_params(spec, 1, 1)
    last = stage_params(spec, 1, 2)[1]
    assert "model.decoder.embed_tokens.weight" not in last
    assert torch.equal(last["lm_head.weight"], full["model.decoder.embed_tokens.weight"])


def test_values_do_not_depend_on_the_chunk_size(monkeypatch):
    spec = resolve("tiny")
    (big,) = stage_params(spec, 2, 1)[:1]
    monkeypatch.setattr(loader, "_CHUNK", 100)  # many chunks, ragged last one
    (small,) = stage_params(spec, 2, 1)[:1]
    for name in big:
        assert torch.equal(big[name], small[name]), name


def splitmix64(key: int, i: int) -> int:
    """Reference: the i-th output (0-based) of splitmix64 seeded with key, in Python integers."""
    m = (1 << 64) - 1
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_hashed_values_are_irwin_hall_sums_of_splitmix64():
    key = 0xDEADBEEF12345678
    index = torch.tensor([0, 1, 2, 12345, (1 << 40) + 7], dtype=torch.int64)
    got = hashed_normal(key, index).double()
    scale = 0.02 / (4 * ((1 << 32) - 1) / 12) ** 0.5
    for value, i in zip(got.tolist(), index.tolist(), strict=True):
        z = splitmix64(key, i)
        fields = sum((z >> s) & 0xFFFF for s in (0, 16, 32, 48))
        assert value == pytest.approx((fields - 2 * 0xFFFF) * scale, rel=1e-6)


def test_matrices_have_std_002_and_bounded_tails():
    (params,) = stage_params(resolve("tiny"), 1, 1, seed=5)
    embed = params["model.embed_tokens.weight"].double()  # 16,640 values
    assert abs(embed.mean().item()) < 1e-3
    assert embed.std().item() == pytest.approx(0.02, rel=0.03)
    assert embed.abs().max().item() <= 0.02 * 3.47


def test_biases_are_0_and_norm_weights_1():
    (params,) = stage_params(small_opt(), 1, 1)
    assert torch.equal(params["model.decoder.layers.0.fc1.bias"], torch.zeros(64))
    assert torch.equal(params["model.decoder.layers.0.final_layer_norm.weight"], torch.ones(32))
    assert torch.equal(params["model.decoder.final_layer_norm.bias"], torch.zeros(32))


def test_seeds_give_different_models():
    (a,) = stage_params(resolve("tiny"), 1, 1, seed=0)
    (b,) = stage_params(resolve("tiny"), 1, 1, seed=1)
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_tiny_logits_at_tp2_equal_tp1():
    reference = ModelRunner("tiny", rank=0).forward(SEQS)
    kwargs = dict(model="tiny", tp=2, init_method=f"tcp://127.0.0.1:{free_port()}")
    group = RunnerGroup("energon.runner:ModelRunner", 2, kwargs)
    try:
        logits, other = group.broadcast("forward", SEQS)
    finally:
        group.close()
    assert other is None
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(logits.argmax(-1), reference.argmax(-1))
