"""LLaMA / Mistral / Qwen2 variants in one process (tp=1, pp=1) give Hugging Face's logits."""

import json

import pytest
import torch
from conftest import hf_logits, make_llama, make_mistral, make_qwen2
from safetensors import safe_open

from energon.runner import ModelRunner

SEQS = [[1, 5, 9, 3, 7, 11, 2, 4, 6, 8, 10, 12], [2], [3, 12, 13, 14, 15], [4, 8, 8]]


def sharpen_attention(hf, folder):
    """Unit input norms and large q/k weights: attention becomes peaked, so positions (RoPE,
    masks) move the logits by ~0.1 instead of ~1e-5; re-saves the checkpoint."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "input_layernorm" in name:
                p.fill_(1.0)
            if "q_proj.weight" in name or "k_proj.weight" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    hf.save_pretrained(folder)
    return hf


def assert_parity(folder, hf, seqs=SEQS):
    hf = sharpen_attention(hf, folder)
    logits = ModelRunner(str(folder), rank=0).forward(seqs)
    torch.testing.assert_close(logits, hf_logits(hf, seqs), rtol=0, atol=1e-4)


VARIANTS = {
    "llama_untied": (make_llama, {}),
    "llama_tied": (make_llama, {"tie_word_embeddings": True}),
    "llama_attention_and_mlp_bias": (make_llama, {"attention_bias": True, "mlp_bias": True}),
    "llama_gqa_4_to_1": (make_llama, {"num_key_value_heads": 1}),
    "mistral_explicit_head_dim": (make_mistral, {"head_dim": 32}),
    "qwen2_untied": (make_qwen2, {"tie_word_embeddings": False}),
    "rope_theta_500000": (
        make_llama,
        {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
    ),
    "rope_linear_x4": (
        make_llama,
        {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
    ),
    "rope_llama3": (
        make_llama,
        {
            "head_dim": 32,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_variant_logits_equal_transformers(tmp_path, variant):
    maker, overrides = variant
    assert_parity(tmp_path, maker(tmp_path, **overrides))


def test_dynamic_ntk_scales_each_sequence_by_its_own_length(tmp_path):
    # max_position_embeddings 8: the 12-token sequence is stretched, the short ones are not,
    # exactly as HF does for each sequence run alone, although they share one packed batch
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    hf = make_llama(tmp_path, max_position_embeddings=8, rope_parameters=rope)
    assert_parity(tmp_path, hf)


def test_legacy_rope_theta_and_rope_scaling_keys_are_read(tmp_path):
    # transformers < 5 wrote rope_theta / rope_scaling at the top level of config.json
    hf = make_llama(
        tmp_path, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    )
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    del config["rope_parameters"]
    config.update(rope_theta=5000.0, rope_scaling={"type": "linear", "factor": 2.0})
    config_file.write_text(json.dumps(config))
    assert_parity(tmp_path, hf)


def test_parameter_names_are_checkpoint_tensor_names(tmp_path):
    make_qwen2(tmp_path, tie_word_embeddings=False)
    runner = ModelRunner(str(tmp_path), rank=0)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert {name for name, _ in runner.model.named_parameters()} == keys


def test_tiny_preset_runs_with_seeded_random_weights():
    a = ModelRunner("tiny", rank=0, seed=1).forward([[256, 72, 105], [256]])
    b = ModelRunner("tiny", rank=0, seed=1).forward([[256, 72, 105], [256]])
    c = ModelRunner("tiny", rank=0, seed=2).forward([[256, 72, 105], [256]])
    assert a.shape == (4, 260)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-3), ("bfloat16", 0.1)])
def test_cuda_runner_packed_padded_and_cached_equal_transformers(tmp_path, dtype, atol):
    from test_parity import decode_steps

    hf = sharpen_attention(make_qwen2(tmp_path), tmp_path)
    runner = ModelRunner(str(tmp_path), rank=0, device="cuda", dtype=dtype)
    expected = hf_logits(hf, SEQS)
    torch.testing.assert_close(runner.forward(SEQS), expected, rtol=0, atol=atol)
    torch.testing.assert_close(runner.forward_padded(SEQS), expected, rtol=0, atol=atol)
    seqs = [s for s in SEQS if len(s) > 3]
    prompt_lens = [len(s) - 2 for s in seqs]
    steps, num_blocks, block_size = decode_steps(seqs, prompt_lens)
    runner.init_kv_cache(num_blocks, block_size)
    rows = [runner.execute(step) for step in steps]
    full = hf_logits(hf, seqs).split([len(s) for s in seqs])
    for b, (seq_logits, p) in enumerate(zip(full, prompt_lens, strict=True)):
        got = torch.stack([r[b] for r in rows])
        torch.testing.assert_close(got, seq_logits[p - 1 : p + 2], rtol=0, atol=atol)
