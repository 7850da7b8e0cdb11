"""BLOOM in Energon gives Hugging Face's logits (tp=1, pp=1, in process)."""

import pytest
import torch
from in_process import (
    build,
    cached_logits,
    energon_logits,
    hf_logits,
    hf_rows_from,
    save_random_checkpoint,
)
from transformers import BloomConfig, BloomForCausalLM
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from energon.errors import CheckpointError
from energon.models import bloom
from energon.parallel.topology import ParallelState, Topology, use_parallel

SEQS = [[1, 5, 9, 3, 7, 2], [4, 8], [11, 12, 13, 14, 15, 16, 17, 100, 127]]
VARIANTS = {
    "4_heads": dict(hidden_size=64, n_head=4),
    "6_heads": dict(hidden_size=48, n_head=6),
    "residual_post_ln": dict(
        hidden_size=48, n_head=6, apply_residual_connection_post_layernorm=True
    ),
    "untied": dict(hidden_size=64, n_head=4, tie_word_embeddings=False),
}


def checkpoint(tmp_path, **overrides):
    hf = BloomForCausalLM(BloomConfig(n_layer=2, vocab_size=128, **overrides))
    save_random_checkpoint(hf, tmp_path)
    return hf, build(tmp_path)


@pytest.mark.parametrize("num_heads", [1, 4, 6, 12, 20, 112])
def test_alibi_slopes_equal_transformers(num_heads):
    # HF's public helper: slope_h * key_position; at position 1 that is the slope itself.
    expected = build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0, 1]
    torch.testing.assert_close(torch.tensor(bloom.alibi_slopes(num_heads)), expected)


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_packed_batch_logits_equal_transformers(tmp_path, overrides):
    hf, model = checkpoint(tmp_path, **overrides)
    torch.testing.assert_close(energon_logits(model, SEQS), hf_logits(hf, SEQS), rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["4_heads", "6_heads"])
def test_prefill_then_decode_through_kv_cache_equals_full_forward(tmp_path, variant):
    hf, model = checkpoint(tmp_path, **VARIANTS[variant])
    prompts, continuations = [[1, 5, 9, 3, 7], [4, 8], [11, 12, 13]], [[6, 2, 9]] * 3
    torch.testing.assert_close(
        cached_logits(model, prompts, continuations),
        hf_rows_from(hf, prompts, continuations),
        rtol=0,
        atol=1e-4,
    )


def test_parameter_names_equal_checkpoint_names(tmp_path):
    hf, model = checkpoint(tmp_path, **VARIANTS["6_heads"])
    assert set(dict(model.named_parameters())) == set(dict(hf.named_parameters()))


def test_tp_that_does_not_divide_heads_is_refused():
    config = dict(hidden_size=48, n_head=6, n_layer=2, vocab_size=128)
    with (
        use_parallel(ParallelState(Topology(tp=4))),
        pytest.raises(CheckpointError, match="n_head=6"),
    ):
        bloom.BloomForCausalLM(config)
