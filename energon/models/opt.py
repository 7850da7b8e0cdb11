"""OPT (OPTForCausalLM), written once like single-device PyTorch.

Parameter names equal the Hugging Face checkpoint's (`model.decoder.layers.3.self_attn.q_proj.weight`).
Covers both layer-norm placements (`do_layer_norm_before`: OPT-350m is post-LN, the rest pre-LN),
the word-embedding projection of OPT-350m (`word_embed_proj_dim != hidden_size` adds
`project_in` / `project_out`), learned positions offset by 2, and `enable_bias`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from energon.kernels.norms import LayerNorm
from energon.models.stack import run_layers
from energon.parallel.attention import Attention
from energon.parallel.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    divide,
    merge_columns,
    merged,
)
from energon.parallel.packing import BatchMeta
from energon.parallel.topology import current_parallel

ARCHITECTURES = ("OPTForCausalLM",)

# HF's ACT2FN names for the activations OPT checkpoints use (all released ones: relu).
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}

# OPT's learned positions are looked up at position + 2 (a fairseq padding leftover).
POSITION_OFFSET = 2


def layer_norm(config: dict, dim: int) -> LayerNorm:
    return LayerNorm(dim, elementwise_affine=config.get("layer_norm_elementwise_affine", True))


class OPTAttention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        bias = config.get("enable_bias", True)
        tp = current_parallel().tp_size
        head_dim = hidden // heads
        self.q_proj = ColumnParallelLinear(hidden, hidden, bias=bias)
        self.k_proj = ColumnParallelLinear(hidden, hidden, bias=bias)
        self.v_proj = ColumnParallelLinear(hidden, hidden, bias=bias)
        self.out_proj = RowParallelLinear(hidden, hidden, bias=bias)
        self.attn = Attention(heads // tp, heads // tp, head_dim, head_dim**-0.5)

    def after_load(self) -> None:
        merge_columns(self.q_proj, self.k_proj, self.v_proj)  # then one GEMM for q, k, v

    def forward(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        q, k, v = merged(x, self.q_proj, self.k_proj, self.v_proj)
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, bias = config["hidden_size"], config.get("enable_bias", True)
        self.do_layer_norm_before = config.get("do_layer_norm_before", True)
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = layer_norm(config, hidden)
        self.fc1 = ColumnParallelLinear(hidden, config["ffn_dim"], bias=bias)
        self.fc2 = RowParallelLinear(config["ffn_dim"], hidden, bias=bias)
        self.final_layer_norm = layer_norm(config, hidden)
        self.act = ACTIVATIONS[config.get("activation_function", "relu")]

    def forward(self, hidden: torch.Tensor, meta: BatchMeta, residual=None):
        """(out, residual): this layer's output is out + residual (energon/models/stack.py)."""
        if self.do_layer_norm_before:  # OPT-125m, 1.3b, ..., 175b
            normed, residual = self.self_attn_layer_norm.add_norm(hidden, residual)
            attn_out = self.self_attn(normed, meta)
            normed, residual = self.final_layer_norm.add_norm(attn_out, residual)
            return self.fc2(self.fc1(normed, self.act)), residual
        # OPT-350m: each residual sum is normalised after the sublayer
        hidden, _ = self.self_attn_layer_norm.add_norm(self.self_attn(hidden, meta), hidden)
        hidden, _ = self.final_layer_norm.add_norm(self.fc2(self.fc1(hidden, self.act)), hidden)
        return hidden, None


class OPTDecoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden = config["hidden_size"]
        embed_dim = config.get("word_embed_proj_dim") or hidden
        self.embed_tokens = VocabParallelEmbedding(config["vocab_size"], embed_dim)
        self.embed_positions = nn.Embedding(
            config.get("max_position_embeddings", 2048) + POSITION_OFFSET, hidden
        )
        # Replicated: these are small (hidden x word_embed_proj_dim) and run once per token.
        self.project_in = nn.Linear(embed_dim, hidden, bias=False) if embed_dim != hidden else None
        self.project_out = nn.Linear(hidden, embed_dim, bias=False) if embed_dim != hidden else None
        keep_final_norm = config.get("do_layer_norm_before", True) and not config.get(
            "_remove_final_layer_norm", False
        )
        self.final_layer_norm = layer_norm(config, hidden) if keep_final_norm else None
        self.layers = nn.ModuleList(
            OPTDecoderLayer(config) for _ in range(config["num_hidden_layers"])
        )


class OPTModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    layers_path = "model.decoder.layers"
    first_stage_modules = (
        "model.decoder.embed_tokens",
        "model.decoder.embed_positions",
        "model.decoder.project_in",
    )
    last_stage_modules = ("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head")
    tied_weights = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: dict):
        super().__init__()
        tp = current_parallel().tp_size
        # every rank runs whole heads
        divide(config["num_attention_heads"], tp, "num_attention_heads")
        divide(config["vocab_size"], tp, "vocab_size")
        self.config = config
        self.hidden_size = config["hidden_size"]
        self.model = OPTModel(config)
        embed_dim = config.get("word_embed_proj_dim") or self.hidden_size
        self.lm_head = ParallelLMHead(config["vocab_size"], embed_dim)
        if config.get("tie_word_embeddings", True):
            self.lm_head.tie(self.model.decoder.embed_tokens)
        else:
            self.tied_weights = {}
        # Name only the modules this variant has (project_in/out, final_layer_norm are optional).
        decoder = self.model.decoder
        present = {f"model.decoder.{n}" for n, m in decoder.named_children() if m is not None}
        present.add("lm_head")
        self.first_stage_modules = tuple(n for n in self.first_stage_modules if n in present)
        self.last_stage_modules = tuple(n for n in self.last_stage_modules if n in present)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.decoder.layers

    def embed(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """Token embeddings (projected to hidden) plus learned positions: `[T]` -> `[T, hidden]`."""
        decoder = self.model.decoder
        tokens = decoder.embed_tokens(input_ids)
        if decoder.project_in is not None:
            tokens = decoder.project_in(tokens)
        return tokens + decoder.embed_positions(meta.positions + POSITION_OFFSET)

    def head(self, hidden: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """Final norm, projection and LM head on `meta.logits_indices` rows: `[N, vocab]`."""
        decoder = self.model.decoder
        if meta.logits_indices is not None:
            hidden = hidden[meta.logits_indices]
        if decoder.final_layer_norm is not None:
            hidden = decoder.final_layer_norm(hidden)
        if decoder.project_out is not None:
            hidden = decoder.project_out(hidden)
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """The whole model on one device (pp=1): [T] ids -> [N, vocab] logits."""
        hidden = run_layers(self.layers, self.embed(input_ids, meta), meta)
        return self.head(hidden, meta)
