"""GPT-2 in Energon gives Hugging Face's logits (tp=1, pp=1, in process)."""

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
from transformers import GPT2Config, GPT2LMHeadModel

from energon.errors import CheckpointError
from energon.models import gpt2
from energon.parallel.topology import ParallelState, Topology, use_parallel

SEQS = [[1, 5, 9, 3, 7, 2], [4, 8], [11, 12, 13, 14, 15, 16, 17, 100, 127]]
TINY = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)


def checkpoint(tmp_path, **overrides):
    hf = GPT2LMHeadModel(GPT2Config(**{**TINY, **overrides}))
    save_random_checkpoint(hf, tmp_path)
    return hf, build(tmp_path)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": False},
        {"scale_attn_by_inverse_layer_idx": True, "n_inner": 96},
        {"activation_function": "gelu", "scale_attn_weights": False},
    ],
    ids=["tied", "untied", "inverse_layer_scale", "exact_gelu_unscaled"],
)
def test_packed_batch_logits_equal_transformers(tmp_path, overrides):
    hf, model = checkpoint(tmp_path, **overrides)
    torch.testing.assert_close(energon_logits(model, SEQS), hf_logits(hf, SEQS), rtol=0, atol=1e-4)


def test_prefill_then_decode_through_kv_cache_equals_full_forward(tmp_path):
    hf, model = checkpoint(tmp_path)
    prompts, continuations = [[1, 5, 9, 3, 7], [4, 8], [11, 12, 13]], [[6, 2, 9]] * 3
    torch.testing.assert_close(
        cached_logits(model, prompts, continuations),
        hf_rows_from(hf, prompts, continuations),
        rtol=0,
        atol=1e-4,
    )


def test_parameter_names_equal_checkpoint_names(tmp_path):
    hf, model = checkpoint(tmp_path)
    assert set(dict(model.named_parameters())) == set(dict(hf.named_parameters()))


def test_tp_that_does_not_divide_heads_is_refused():
    config = {**TINY, "n_head": 6, "n_embd": 48}
    with (
        use_parallel(ParallelState(Topology(tp=4))),
        pytest.raises(CheckpointError, match="n_head=6"),
    ):
        gpt2.GPT2LMHeadModel(config)
