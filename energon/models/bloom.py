"""BLOOM (BloomForCausalLM), written once like single-device PyTorch.

Parameter names equal the Hugging Face checkpoint's (`transformer.h.3.self_attention.query_key_value.weight`).
BLOOM has no position embeddings: attention adds ALiBi biases, one slope per head. The fused
`query_key_value` rows are interleaved per head as `[num_heads, 3, head_dim]`, so a tensor-parallel
rank's heads are one contiguous row range and the default column-parallel loader reads them.
"""

from __future__ import annotations

import math

import torch
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
)
from energon.parallel.packing import BatchMeta
from energon.parallel.topology import current_parallel

ARCHITECTURES = ("BloomForCausalLM",)


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi slope of every head, as HF's BLOOM computes them (Press et al., non-power-of-2 rule).

    For n heads with p the largest power of 2 <= n: heads 0..p-1 get base**(1..p) with
    base = 2**(-8/p); the remaining n-p heads get the odd powers 1, 3, 5, ... of 2**(-8/(2p)).
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base**i for i in range(1, closest + 1)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        slopes += [extra_base**i for i in range(1, 1 + 2 * remaining, 2)]
    return slopes


def bloom_gelu(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation with BLOOM's rounded constants (HF `bloom_gelu_forward`)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def bloom_hidden_size(config: dict) -> int:
    """BLOOM configs name the width `hidden_size` (new) or `n_embed` (bigscience's originals)."""
    return config["hidden_size"] if "hidden_size" in config else config["n_embed"]


class BloomAttention(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, heads = bloom_hidden_size(config), config["n_head"]
        parallel = current_parallel()
        self.local_heads = heads // parallel.tp_size
        self.head_dim = hidden // heads
        self.query_key_value = ColumnParallelLinear(hidden, 3 * hidden)
        self.dense = RowParallelLinear(hidden, hidden)
        first = parallel.tp_rank * self.local_heads
        # This rank's heads' slopes. An explicit CPU tensor: the model may be built on the meta
        # device, and a plain attribute is not materialised with the parameters.
        slopes = torch.tensor(
            alibi_slopes(heads)[first : first + self.local_heads], dtype=torch.float32, device="cpu"
        )
        self.attn = Attention(
            self.local_heads, self.local_heads, self.head_dim, self.head_dim**-0.5, slopes
        )

    def forward(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        qkv = self.query_key_value(x).view(-1, self.local_heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, i].reshape(-1, self.local_heads * self.head_dim) for i in range(3))
        return self.dense(self.attn(q, k, v, meta))


class BloomMLP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden = bloom_hidden_size(config)
        self.dense_h_to_4h = ColumnParallelLinear(hidden, 4 * hidden)
        self.dense_4h_to_h = RowParallelLinear(4 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(bloom_gelu(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = bloom_hidden_size(config), config.get("layer_norm_epsilon", 1e-5)
        self.input_layernorm = LayerNorm(hidden, eps=eps)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = LayerNorm(hidden, eps=eps)
        self.mlp = BloomMLP(config)
        self.residual_from_norm = config.get("apply_residual_connection_post_layernorm", False)

    def forward(self, hidden: torch.Tensor, meta: BatchMeta, residual=None):
        """(out, residual): this layer's output is out + residual (energon/models/stack.py)."""
        normed, hidden = self.input_layernorm.add_norm(hidden, residual)
        residual = normed if self.residual_from_norm else hidden
        attn_out = self.self_attention(normed, meta)
        normed, hidden = self.post_attention_layernorm.add_norm(attn_out, residual)
        residual = normed if self.residual_from_norm else hidden
        return self.mlp(normed), residual


class BloomModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, eps = bloom_hidden_size(config), config.get("layer_norm_epsilon", 1e-5)
        self.word_embeddings = VocabParallelEmbedding(config["vocab_size"], hidden)
        self.word_embeddings_layernorm = LayerNorm(hidden, eps=eps)
        self.h = nn.ModuleList(BloomBlock(config) for _ in range(config["n_layer"]))
        self.ln_f = LayerNorm(hidden, eps=eps)


class BloomForCausalLM(nn.Module):
    layers_path = "transformer.h"
    first_stage_modules = ("transformer.word_embeddings", "transformer.word_embeddings_layernorm")
    last_stage_modules = ("transformer.ln_f", "lm_head")
    tied_weights = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: dict):
        super().__init__()
        config = {**config, "n_layer": config.get("n_layer", config.get("num_hidden_layers"))}
        config["n_head"] = config.get("n_head", config.get("num_attention_heads"))
        tp = current_parallel().tp_size
        divide(config["n_head"], tp, "n_head")  # every rank runs whole heads
        divide(config["vocab_size"], tp, "vocab_size")
        self.config = config
        self.hidden_size = bloom_hidden_size(config)
        self.transformer = BloomModel(config)
        self.lm_head = ParallelLMHead(config["vocab_size"], self.hidden_size)
        if config.get("tie_word_embeddings", True):
            self.lm_head.tie(self.transformer.word_embeddings)
        else:
            self.tied_weights = {}

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.h

    def embed(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """Token embeddings, layer-normed (BLOOM has no position embeddings): `[T, hidden]`."""
        return self.transformer.word_embeddings_layernorm(
            self.transformer.word_embeddings(input_ids)
        )

    def head(self, hidden: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """Final norm and LM head on the rows `meta.logits_indices` (all when None): `[N, vocab]`."""
        if meta.logits_indices is not None:
            hidden = hidden[meta.logits_indices]
        return self.lm_head(self.transformer.ln_f(hidden))

    def forward(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """The whole model on one device (pp=1): [T] ids -> [N, vocab] logits."""
        hidden = run_layers(self.layers, self.embed(input_ids, meta), meta)
        return self.head(hidden, meta)
