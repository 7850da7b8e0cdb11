"""LLaMA, Mistral and Qwen2 (LlamaForCausalLM and its close cousins), written like single-device code.

Parameter names equal the Hugging Face checkpoint's (`model.layers.3.self_attn.q_proj.weight`).
Covers RoPE with the config's scaling (default, linear, dynamic NTK, llama3), grouped-query
attention, q/k/v biases (Qwen2, or LLaMA's `attention_bias`), tied or untied embeddings, RMSNorm
and SwiGLU. Sliding-window attention (Mistral, Qwen2 with use_sliding_window) is not applied: it
only matters past the window (4096+ tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from energon.kernels.norms import RMSNorm
from energon.kernels.rope import rotary_kernels_for, silu_mul
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

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def rope_parameters(config: dict) -> dict:
    """The RoPE settings whether the config is transformers 5 (`rope_parameters`) or older
    (`rope_theta` + `rope_scaling`); returns a dict with at least rope_type and rope_theta."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


class RotaryEmbedding:
    """Rotates q/k by absolute position, matching HF's cos/sin (computed in float32, cast to x).

    A plain object, not a module: it holds no checkpoint tensors and every layer shares it.
    """

    def __init__(self, config: dict, head_dim: int):
        self.params = rope_parameters(config)
        self.head_dim = head_dim
        self.max_positions = config.get("max_position_embeddings", 2048)
        self.inv_freq_cache: dict = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        """[dim/2] inverse frequencies, scaled as the config says (cached per device)."""
        if device not in self.inv_freq_cache:
            p, kind = self.params, self.params["rope_type"]
            inv = 1.0 / (p["rope_theta"] ** self.exponents(device))
            if kind == "linear":
                inv = inv / p["factor"]
            elif kind == "llama3":
                inv = llama3_scaled(
                    inv, {"original_max_position_embeddings": self.max_positions, **p}
                )
            elif kind not in ("default", "dynamic"):
                raise NotImplementedError(f"rope_type {kind!r} is not supported by energon's llama")
            self.inv_freq_cache[device] = inv
        return self.inv_freq_cache[device]

    def exponents(self, device: torch.device) -> torch.Tensor:
        return (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(device, torch.float32)
            / self.head_dim
        )

    def dynamic_inv_freq(self, meta: BatchMeta, device: torch.device) -> torch.Tensor:
        """Dynamic NTK, per sequence: past max_position_embeddings the base grows with the
        sequence's own length (HF's rule for one sequence), so a request's logits never depend on
        which others share its batch. Returns [T, dim/2]."""
        factor, dim, trained = self.params["factor"], self.head_dim, self.max_positions
        seq_len = meta.context_lens.to(device, torch.float32).clamp(min=trained)
        base = self.params["rope_theta"] * ((factor * seq_len / trained) - (factor - 1)) ** (
            dim / (dim - 2)
        )
        counts = (meta.cu_seqlens[1:] - meta.cu_seqlens[:-1]).to(device)
        base = torch.repeat_interleave(base, counts, output_size=meta.num_tokens)
        return 1.0 / (base[:, None] ** self.exponents(device))

    def __call__(self, q, k, positions, meta: BatchMeta):
        """q [T, H, D], k [T, Hkv, D] → rotated (q, k); on CUDA one kernel, in place."""
        if self.params["rope_type"] == "dynamic" and meta.max_context_len > self.max_positions:
            freqs = positions[:, None].float() * self.dynamic_inv_freq(meta, q.device)
        elif kernels := rotary_kernels_for(q, k):
            return kernels.rotate_(q, k, positions, self.inv_freq(q.device))
        else:
            freqs = positions[:, None].float() * self.inv_freq(q.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def llama3_scaled(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: low frequencies / factor, high kept, a ramp between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config: dict, rope: RotaryEmbedding):
        super().__init__()
        tp = current_parallel().tp_size
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        self.head_dim = config.get("head_dim") or hidden // heads
        self.heads = divide(heads, tp, "num_attention_heads")
        self.kv_heads = divide(kv_heads, tp, "num_key_value_heads")
        qkv_bias = config.get("attention_bias", False) or "Qwen2ForCausalLM" in config.get(
            "architectures", ()
        )
        self.q_proj = ColumnParallelLinear(hidden, heads * self.head_dim, bias=qkv_bias)
        self.k_proj = ColumnParallelLinear(hidden, kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = ColumnParallelLinear(hidden, kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = RowParallelLinear(
            heads * self.head_dim, hidden, bias=config.get("attention_bias", False)
        )
        self.rope = rope
        self.attn = Attention(self.heads, self.kv_heads, self.head_dim, self.head_dim**-0.5)

    def after_load(self) -> None:
        merge_columns(self.q_proj, self.k_proj, self.v_proj)  # then one GEMM for q, k, v

    def forward(self, x: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = merged(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(T, self.heads, self.head_dim)
        k = k.view(T, self.kv_heads, self.head_dim)
        q, k = self.rope(q, k, meta.positions, meta)
        out = self.attn(q.reshape(T, -1), k.reshape(T, -1), v, meta)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden, inner = config["hidden_size"], config["intermediate_size"]
        divide(inner, current_parallel().tp_size, "intermediate_size")
        bias = config.get("mlp_bias", False)
        self.gate_proj = ColumnParallelLinear(hidden, inner, bias=bias)
        self.up_proj = ColumnParallelLinear(hidden, inner, bias=bias)
        self.down_proj = RowParallelLinear(inner, hidden, bias=bias)
        name = config.get("hidden_act", "silu")
        act = ACTIVATIONS[name]
        # act(gate) * up; SwiGLU's is one kernel on CUDA
        self.act_mul = silu_mul if name == "silu" else lambda gate, up: act(gate) * up

    def after_load(self) -> None:
        merge_columns(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = merged(x, self.gate_proj, self.up_proj)
        return self.down_proj(self.act_mul(gate, up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: dict, rope: RotaryEmbedding):
        super().__init__()
        eps = config.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(config, rope)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], eps)

    def forward(self, hidden: torch.Tensor, meta: BatchMeta, residual=None):
        """(out, residual): this layer's output is out + residual (energon/models/stack.py)."""
        normed, residual = self.input_layernorm.add_norm(hidden, residual)
        attn_out = self.self_attn(normed, meta)
        normed, residual = self.post_attention_layernorm.add_norm(attn_out, residual)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        hidden = config["hidden_size"]
        head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
        rope = RotaryEmbedding(config, head_dim)
        self.embed_tokens = VocabParallelEmbedding(config["vocab_size"], hidden)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, rope) for _ in range(config["num_hidden_layers"])
        )
        self.norm = RMSNorm(hidden, config.get("rms_norm_eps", 1e-6))


class LlamaForCausalLM(nn.Module):
    layers_path = "model.layers"
    first_stage_modules = ("model.embed_tokens",)
    last_stage_modules = ("model.norm", "lm_head")

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.hidden_size = config["hidden_size"]
        self.model = LlamaModel(config)
        self.lm_head = ParallelLMHead(config["vocab_size"], self.hidden_size)
        self.tied_weights = {}
        if config.get("tie_word_embeddings", False):
            self.lm_head.tie(self.model.embed_tokens)
            self.tied_weights = {"lm_head.weight": "model.embed_tokens.weight"}

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def embed(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def head(self, hidden: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        if meta.logits_indices is not None:
            hidden = hidden[meta.logits_indices]
        return self.lm_head(self.model.norm(hidden))

    def forward(self, input_ids: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
        """The whole model on one device (pp=1): [T] ids → [N, vocab] logits."""
        hidden = run_layers(self.layers, self.embed(input_ids, meta), meta)
        return self.head(hidden, meta)


MistralForCausalLM = LlamaForCausalLM
Qwen2ForCausalLM = LlamaForCausalLM
