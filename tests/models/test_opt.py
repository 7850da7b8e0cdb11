"""OPT in Energon gives Hugging Face's logits (tp=1, pp=1, in process)."""

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
from transformers import OPTConfig, OPTForCausalLM

from energon.errors import CheckpointError
from energon.models import opt
from energon.parallel.topology import ParallelState, Topology, use_parallel

SEQS = [[2, 5, 9, 3, 7, 11], [2, 8], [2, 12, 13, 14, 15, 16, 17, 100, 127]]
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    ffn_dim=96,
    vocab_size=128,
    max_position_embeddings=64,
)
VARIANTS = {
    "pre_ln": {},
    "post_ln_350m": {"do_layer_norm_before": False},
    "projected_350m": {"do_layer_norm_before": False, "word_embed_proj_dim": 32},
    "pre_ln_projected": {"word_embed_proj_dim": 32},
    "no_final_norm": {"_remove_final_layer_norm": True},
    "no_bias_no_affine": {"enable_bias": False, "layer_norm_elementwise_affine": False},
    "untied": {"tie_word_embeddings": False},
}


def checkpoint(tmp_path, **overrides):
    hf = OPTForCausalLM(OPTConfig(**{**TINY, **overrides}))
    save_random_checkpoint(hf, tmp_path)
    return hf, build(tmp_path)


@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_packed_batch_logits_equal_transformers(tmp_path, overrides):
    hf, model = checkpoint(tmp_path, **overrides)
    torch.testing.assert_close(energon_logits(model, SEQS), hf_logits(hf, SEQS), rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["pre_ln", "projected_350m"])
def test_prefill_then_decode_through_kv_cache_equals_full_forward(tmp_path, variant):
    hf, model = checkpoint(tmp_path, **VARIANTS[variant])
    prompts, continuations = [[2, 5, 9, 3, 7], [2, 8], [2, 12, 13]], [[6, 1, 9]] * 3
    torch.testing.assert_close(
        cached_logits(model, prompts, continuations),
        hf_rows_from(hf, prompts, continuations),
        rtol=0,
        atol=1e-4,
    )


@pytest.mark.parametrize("variant", ["pre_ln", "projected_350m", "no_final_norm"])
def test_parameter_names_equal_checkpoint_names(tmp_path, variant):
    hf, model = checkpoint(tmp_path, **VARIANTS[variant])
    assert set(dict(model.named_parameters())) == set(dict(hf.named_parameters()))


def test_tp_that_does_not_divide_vocab_is_refused():
    config = {**TINY, "vocab_size": 130}
    with use_parallel(ParallelState(Topology(tp=4))), pytest.raises(CheckpointError, match="vocab"):
        opt.OPTForCausalLM(config)
