"""GPT-2 (GPT2LMHeadModel), written once like single-device PyTorch.

Parameter names equal the Hugging Face checkpoint's (`transformer.h.3.attn.c_attn.weight`, ...).
HF stores GPT-2's linears as `Conv1D`, weight `[in, out]`; Energon's linears hold `[out, in]`, so
each linear here gets a `weight_loader` that reads its slice of the checkpoint tensor and transposes.
`c_attn` fuses q, k and v along the output dimension: a tensor-parallel rank reads three column
slices (its heads of q, of k and of v) and keeps them stacked as `[q; k; v]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from energon.errors import CheckpointError
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

ARCHITECTURES = ("GPT2LMHeadModel",)

# HF's ACT2FN names for the activations GPT-2 checkpoints use. The tanh approximations
# ("gelu_new", "gelu_fast", "gelu_pytorch_tanh") agree to float rounding.
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


def expect_shape(reader, expected: tuple[int, ...]) -> None:
    """Raise CheckpointError naming the tensor when its full shape is not `expected`."""
    if tuple(reader.shape) != tuple(expected):
        raise CheckpointError(
            f"tensor {reader.name}: expected shape {tuple(expected)}, found {tuple(reader.shape)}"
        )


def conv1d_column_loader(param: nn.Parameter, reader) -> None:
    """Column-parallel shard of a Conv1D weight `[in, out]`: this rank's output columns, transposed."""
    rows, cols = param.shape
    expect_shape(reader, (cols, rows * param.tp_size))
    start = param.tp_rank * rows
    param.data.copy_(reader[:, start : start + rows].t())


def conv1d_row_loader(param: nn.Parameter, reader) -> None:
    """Row-parallel shard of a Conv1D weight `[in, out]`: this rank's input rows, transposed."""
    rows, cols = param.shape
    expect_shape(reader, (cols * param.tp_size, rows))
    start = param.tp_rank * cols
    param.data.copy_(reader[start : start + cols, :].t())


def fused_qkv_loader(param: nn.Parameter, reader) -> None:
    """This rank's heads of q, k and v from `c_attn` (weight `[in, 3*hidden]` or bias `[3*hidden]`).

    The checkpoint's output dimension is `[q | k | v]`, each `hidden` wide; the local parameter
    holds `[q_r; k_r; v_r]` along its output dimension (dim 0), each `hidden / tp` wide.
    """
    width = param.shape[0] // 3
    hidden = width * param.tp_size
    expect_shape(reader, (*param.shape[1:], 3 * hidden))
    start = param.tp_rank * width
    parts = []
    for i in range(3):
        cols = slice(i * hidden + start, i * hidden + start + width)
        parts.append(reader[:, cols].t() if param.dim() == 2 else reader[cols])
    param.data.copy_(torch.cat(parts, dim=0))


class GPT2Attention(nn.Module):
    def __init__(self, config: dict, layer_idx: int):
        super().__init__()
        hidden, heads = config["n_embd"], config["n_head"]
        tp = current_parallel().tp_size
        self.head_dim = hidden // heads
        self.local_width = hidden // tp
        scale = self.head_dim**-0.5 if config.get("scale_attn_weights", True) else 1.0
        if config.get("scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        self.c_attn = ColumnParallelLinear(hidden, 3 * hidden)
        self.c_attn.weight.weight_loader = fused_qkv_loader
        self.c_attn.bias.weight_loader = fused_qkv_loader
        self.c_proj = RowParallelLinear(hidden, hidden)
        self.c_proj.weight.weight_loader = conv1d_row_loader
        self.attn = Attention(heads // tp, heads // tp, self.head_dim, scale)

    def forward(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.local_width, dim=-1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden = config["n_embd"]
        inner = config.get("n_inner") or 4 * hidden
        self.c_fc = ColumnParallelLinear(hidden, inner)
        self.c_fc.weight.weight_loader = conv1d_column_loader
        self.c_proj = RowParallelLinear(inner, hidden)
        self.c_proj.weight.weight_loader = conv1d_row_loader
        self.act = ACTIVATIONS[config.get("activation_function", "gelu_new")]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: dict, layer_idx: int):
        super().__init__()
        hidden, eps = config["n_embd"], config.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden: torch.Tensor, meta: BatchMeta, residual=None):
        """(out, residual): this layer's output is out + residual (energon/models/stack.py)."""
        normed, residual = self.ln_1.add_norm(hidden, residual)
        normed, residual = self.ln_2.add_norm(self.attn(normed, meta), residual)
        return self.mlp(normed), residual


class GPT2Model(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden = config["n_embd"]
        self.wte = VocabParallelEmbedding(config["vocab_size"], hidden)
        self.wpe = nn.Embedding(config.get("n_positions", 1024), hidden)
        self.h = nn.ModuleList(GPT2Block(config, i) for i in range(config["n_layer"]))
        self.ln_f = LayerNorm(hidden, eps=config.get("layer_norm_epsilon", 1e-5))


class GPT2LMHeadModel(nn.Module):
    layers_path = "transformer.h"
    first_stage_modules = ("transformer.wte", "transformer.wpe")
    last_stage_modules = ("transformer.ln_f", "lm_head")
    tied_weights = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: dict):
        super().__init__()
        tp = current_parallel().tp_size
        divide(config["n_head"], tp, "n_head")  # every rank runs whole heads
        divide(config["vocab_size"], tp, "vocab_size")
        self.config = config
        self.hidden_size = config["n_embd"]
        self.transformer = GPT2Model(config)
        self.lm_head = ParallelLMHead(config["vocab_size"], self.hidden_size)
        if config.get("tie_word_embeddings", True):
            self.lm_head.tie(self.transformer.wte)
        else:
            self.tied_weights = {}

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.h

    def embed(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """Token plus learned position embeddings of packed ids `[T]`; returns `[T, hidden]`."""
        return self.transformer.wte(input_ids) + self.transformer.wpe(meta.positions)

    def head(self, hidden: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """Final norm and LM head on the rows `meta.logits_indices` (all when None): `[N, vocab]`."""
        if meta.logits_indices is not None:
            hidden = hidden[meta.logits_indices]
        return self.lm_head(self.transformer.ln_f(hidden))

    def forward(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """The whole model on one device (pp=1): [T] ids -> [N, vocab] logits."""
        hidden = run_layers(self.layers, self.embed(input_ids, meta), meta)
        return self.head(hidden, meta)
