"""Checkpoint loading: each rank reads only its slices; malformed checkpoints name what is wrong."""

import json

import pytest
import torch
from conftest import hf_logits, make_llama, make_qwen2
from safetensors.torch import load_file, save_file

from energon.errors import CheckpointError
from energon.models.loader import load_weights
from energon.models.registry import PRESETS, resolve
from energon.parallel.topology import ParallelState, Topology
from energon.runner import ModelRunner, build_stage


def load_as(folder, tp=1, pp=1, rank=0, dtype=torch.float32):
    """Build and load rank `rank`'s stage in this process (loading needs no process group)."""
    state = ParallelState(Topology(tp, pp), rank)
    model, layers = build_stage(resolve(folder), state, dtype)
    return model, layers, load_weights(model, folder, state)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    return folder, make_llama(folder)


def test_tp2_rank_reads_about_half_the_bytes_and_only_its_rows(llama):
    folder, hf = llama
    *_, full = load_as(folder)
    halves = [load_as(folder, tp=2, rank=r)[2] for r in range(2)]
    for report in halves:
        assert 0.45 * full.bytes < report.bytes < 0.55 * full.bytes
        assert report.tensors == full.tensors
    reads = [{r.tensor: r.index for r in report.reads} for report in halves]
    assert reads[0]["model.layers.0.self_attn.q_proj.weight"] == "[0:32, :]"
    assert reads[1]["model.layers.0.self_attn.q_proj.weight"] == "[32:64, :]"
    assert reads[1]["model.layers.0.mlp.down_proj.weight"] == "[:, 64:128]"
    assert reads[1]["model.embed_tokens.weight"] == "[64:128, :]"
    assert reads[1]["model.norm.weight"] == "[:]"


def test_tp2_shard_holds_the_checkpoint_slice(llama):
    folder, _ = llama
    model, *_ = load_as(folder, tp=2, rank=1)
    full = load_file(folder / "model.safetensors")["model.layers.2.self_attn.o_proj.weight"]
    torch.testing.assert_close(model.model.layers[2].self_attn.o_proj.weight, full[:, 32:])


def test_pipeline_stage_reads_only_its_layers(llama):
    folder, _ = llama
    _, layers, report = load_as(folder, pp=2, rank=1)
    assert layers == range(2, 3)
    names = {r.tensor for r in report.reads}
    assert not any(
        n.startswith(("model.layers.0.", "model.layers.1.", "model.embed")) for n in names
    )
    assert {"model.layers.2.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"} <= names


def test_tied_head_on_last_stage_reads_the_embedding_tensor(tmp_path):
    make_qwen2(tmp_path)  # tie_word_embeddings: no lm_head.weight in the checkpoint
    model, _, report = load_as(tmp_path, pp=2, rank=1)
    assert model.model.embed_tokens is None
    full = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    torch.testing.assert_close(model.lm_head.weight, full)
    assert "model.embed_tokens.weight" in {r.tensor for r in report.reads}


def test_sharded_checkpoint_with_index_loads(tmp_path):
    hf = make_llama(tmp_path / "ckpt")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    seqs = [[1, 2, 3], [4, 5]]
    logits = ModelRunner(str(tmp_path / "sharded"), rank=0).forward(seqs)
    torch.testing.assert_close(logits, hf_logits(hf, seqs), rtol=0, atol=1e-4)
    files = {r.file for r in ModelRunner(str(tmp_path / "sharded"), rank=0).report.reads}
    assert len(files) > 1


def test_weights_are_converted_to_the_target_dtype(llama):
    folder, _ = llama
    model, *_ = load_as(folder, dtype=torch.bfloat16)
    weight = model.model.layers[0].mlp.gate_proj.weight
    assert weight.dtype == torch.bfloat16
    full = load_file(folder / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(weight, full.to(torch.bfloat16))


# -- malformed checkpoints ------------------------------------------------------------------


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_config_names_the_file(llama, tmp_path):
    folder = copy_checkpoint(llama[0], tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing .*config\.json"):
        ModelRunner(str(folder), rank=0)


def test_missing_weights_file_is_named(llama, tmp_path):
    folder = copy_checkpoint(llama[0], tmp_path / "c")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing weights in .*model\.safetensors"):
        ModelRunner(str(folder), rank=0)


def test_missing_shard_listed_in_index_is_named(llama, tmp_path):
    llama[1].save_pretrained(tmp_path / "s", max_shard_size="100KB")
    shard = sorted((tmp_path / "s").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing .*{shard.name}, listed in"):
        ModelRunner(str(tmp_path / "s"), rank=0)


def test_missing_tensor_is_named(llama, tmp_path):
    folder = copy_checkpoint(llama[0], tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match="model.layers.1.post_attention_layernorm.weight is missing"
    ):
        ModelRunner(str(folder), rank=0)


def test_unknown_architecture_is_named(llama, tmp_path):
    folder = copy_checkpoint(llama[0], tmp_path / "c")
    edit_config(folder, architectures=["FooForCausalLM"])
    with pytest.raises(CheckpointError, match="unknown architecture 'FooForCausalLM'"):
        ModelRunner(str(folder), rank=0)


def test_shape_mismatch_names_tensor_expected_and_found(llama, tmp_path):
    folder = copy_checkpoint(llama[0], tmp_path / "c")
    edit_config(folder, intermediate_size=96)
    with pytest.raises(
        CheckpointError,
        match=r"model.layers.0.mlp.gate_proj.weight: expected shape \(96, 64\), found \(128, 64\)",
    ):
        ModelRunner(str(folder), rank=0)


@pytest.mark.parametrize(
    "tp, changes, named",
    [
        (8, {}, "num_attention_heads=4"),
        (4, {"num_key_value_heads": 2}, "num_key_value_heads=2"),
        (4, {"vocab_size": 130}, "vocab_size=130"),
        (4, {"intermediate_size": 126}, "intermediate_size=126"),
    ],
    ids=["heads", "kv_heads", "vocab", "intermediate"],
)
def test_tp_not_dividing_a_split_dimension_is_named(llama, tmp_path, tp, changes, named):
    folder = copy_checkpoint(llama[0], tmp_path / "c")
    edit_config(folder, **changes)
    with pytest.raises(CheckpointError, match=f"tp={tp} does not divide {named}"):
        build_stage(resolve(folder), ParallelState(Topology(tp, 1), 0), torch.float32)


def test_unknown_name_is_neither_folder_nor_preset():
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a preset"):
        resolve("no-such-model")


# -- presets --------------------------------------------------------------------------------


def test_every_preset_resolves_to_a_registered_family():
    for name in PRESETS:
        spec = resolve(name)
        assert spec.is_preset and spec.model_class.__name__ == spec.architecture


@pytest.mark.parametrize(
    "preset, params", [("llama-2-7b", 6_738_415_616), ("llama-2-70b", 68_976_648_192)]
)
def test_llama_presets_have_the_real_parameter_count(preset, params):
    model, _ = build_stage(
        resolve(preset), ParallelState(device=torch.device("meta")), torch.float16
    )
    assert sum(p.numel() for p in model.parameters()) == params
