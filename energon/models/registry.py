"""Model name → family: a Hugging Face checkpoint folder, or a preset for random-weight runs.

Families are modules named by import path and imported only when a model of theirs is resolved.
A family module exposes one class per architecture name it lists in `ARCHITECTURES`.
Presets are HF config dicts with the real models' sizes (weights are random, seeded).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from energon.errors import CheckpointError

FAMILIES = {
    "LlamaForCausalLM": "energon.models.llama",
    "MistralForCausalLM": "energon.models.llama",
    "Qwen2ForCausalLM": "energon.models.llama",
    "GPT2LMHeadModel": "energon.models.gpt2",
    "OPTForCausalLM": "energon.models.opt",
    "BloomForCausalLM": "energon.models.bloom",
}


def _opt(hidden: int, layers: int, heads: int) -> dict:
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": 50272,
        "hidden_size": hidden,
        "word_embed_proj_dim": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "ffn_dim": 4 * hidden,
        "max_position_embeddings": 2048,
        "do_layer_norm_before": True,
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "activation_function": "relu",
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float16",
    }


def _llama2(hidden: int, layers: int, heads: int, kv_heads: int, inner: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 32000,
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float16",
    }


PRESETS: dict[str, dict] = {
    # llama-style, byte-level vocabulary: 256 bytes + <bos>=256, <eos>=257 + 2 spare (divides 2, 4)
    "tiny": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 260,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 256,
        "eos_token_id": 257,
        "torch_dtype": "float32",
    },
    "opt-125m": _opt(768, 12, 12),
    "opt-1.3b": _opt(2048, 24, 32),
    "opt-6.7b": _opt(4096, 32, 32),
    "opt-13b": _opt(5120, 40, 40),
    "opt-30b": _opt(7168, 48, 56),
    "opt-66b": _opt(9216, 64, 72),
    "opt-175b": _opt(12288, 96, 96),
    "llama-2-7b": _llama2(4096, 32, 32, 32, 11008),
    "llama-2-13b": _llama2(5120, 40, 40, 40, 13824),
    "llama-2-70b": _llama2(8192, 80, 64, 8, 28672),
    "bloom-176b": {
        "architectures": ["BloomForCausalLM"],
        "model_type": "bloom",
        "vocab_size": 250880,
        "hidden_size": 14336,
        "n_layer": 70,
        "n_head": 112,
        "layer_norm_epsilon": 1e-5,
        "apply_residual_connection_post_layernorm": False,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "torch_dtype": "bfloat16",
    },
}


@dataclass
class ModelSpec:
    """What to build: the HF-style config, its family module, and the folder (None for presets)."""

    name: str
    config: dict
    architecture: str
    family: ModuleType
    folder: Path | None

    @property
    def model_class(self) -> type:
        return getattr(self.family, self.architecture)

    @property
    def is_preset(self) -> bool:
        return self.folder is None


def family_of(architecture: str) -> ModuleType:
    """Import the family module of an HF architecture name; raises CheckpointError if unknown."""
    if architecture not in FAMILIES:
        raise CheckpointError(
            f"unknown architecture {architecture!r}; energon supports {', '.join(sorted(FAMILIES))}"
        )
    return importlib.import_module(FAMILIES[architecture])


def resolve(model: str | Path) -> ModelSpec:
    """A checkpoint folder (config.json + safetensors) or a preset name → ModelSpec.

    Raises CheckpointError naming the missing config.json, an unreadable config, an unknown
    architecture, or a name that is neither a folder nor a preset.
    """
    name = str(model)
    if name in PRESETS:
        config = json.loads(json.dumps(PRESETS[name]))  # a private copy
        folder = None
    else:
        folder = Path(model)
        if not folder.is_dir():
            raise CheckpointError(
                f"{name!r} is neither a checkpoint folder nor a preset ({', '.join(PRESETS)})"
            )
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"missing {config_file}: a checkpoint folder needs config.json")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {config_file}: {e}") from e
    architectures = config.get("architectures") or []
    if not architectures:
        raise CheckpointError(f"config of {name!r} names no architectures (e.g. LlamaForCausalLM)")
    architecture = architectures[0]
    return ModelSpec(name, config, architecture, family_of(architecture), folder)


def num_layers(config: dict) -> int | None:
    """The number of transformer layers, under the names HF configs use (None if not given)."""
    for key in ("num_hidden_layers", "n_layer"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def context_window(config: dict) -> int | None:
    """The longest sequence the checkpoint was trained for, under the names HF configs use."""
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
