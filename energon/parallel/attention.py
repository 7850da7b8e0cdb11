"""Attention over packed sequences, with an optional paged KV cache.

Each query attends causally (by absolute position) to the keys of its own sequence only. Without a
cache the keys are the step's own new tokens; with one, the new k/v are first written at
`meta.slot_mapping`, then every sequence reads its keys 0..context_len-1 through its block table.

One vectorised implementation serves every device: the packed queries are scattered into a
[B, max_seqlen_q] grid, keys gathered into [B, max_context_len], and `scaled_dot_product_attention`
runs with a mask that is causal by position and cut at each context length. On CUDA SDPA picks its
memory-efficient kernel; on CPU the same code is the reference-checked path. The grid wastes
compute only inside attention and only on ragged edges; linear layers never see a pad.
The padded baseline (`meta.padded_shape`) skips the scatter and uses SDPA's causal kernel.

A fresh prefill (no sequence has cached tokens, `meta.fresh`) writes its K/V to the cache and
attends to the new tokens directly, as without a cache. Faster paths come first where they apply:
flash varlen attention (CUDA, fp16/bf16, no ALiBi; over the paged cache only where torch's
varlen_attn takes block tables), then for decode-like
steps over the cache the Triton kernel of `energon.parallel.paged_attention`, and for other
cached steps (prompts after a cached prefix, later chunks of long prompts) the one of
`energon.parallel.paged_prefill`: both read K/V from the cache pages in place instead of
gathering them into the grid.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from energon.parallel.packing import BatchMeta

try:  # Flash-attention over packed sequences (torch >= 2.10, CUDA, fp16/bf16)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _VARLEN_ARGS = set(inspect.signature(_varlen_attn).parameters)
except ImportError:  # older torch: the SDPA grid path below serves every case
    _varlen_attn, _VARLEN_ARGS = None, set()


def _causal_kwargs() -> dict:
    """How this torch's varlen_attn is told to be causal (bottom-right aligned)."""
    if "window_size" in _VARLEN_ARGS:
        return {"window_size": (-1, 0)}
    return {"is_causal": True}


def kv_pair(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """k and v [T, Hkv, D] as one [T, 2, Hkv, D] view when v starts right after k in each row
    of the same buffer (rows dense inside); None otherwise."""
    T, heads, dim = k.shape
    if (
        v.shape != k.shape
        or v.dtype != k.dtype
        or v.stride() != k.stride()
        or k.stride()[1:] != (dim, 1)
        or v.data_ptr() - k.data_ptr() != heads * dim * k.element_size()
        or (T > 1 and k.stride(0) < 2 * heads * dim)
        or v.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()
    ):
        return None
    return k.as_strided((T, 2, heads, dim), (k.stride(0), heads * dim, dim, 1))


def flash_usable(q: torch.Tensor, alibi: bool, cached: bool) -> bool:
    """Whether the flash varlen kernel can run this call: CUDA, half precision, no ALiBi, and for
    a paged cache a torch whose varlen_attn takes block tables."""
    if (
        _varlen_attn is None
        or alibi
        or not q.is_cuda
        or q.dtype not in (torch.float16, torch.bfloat16)
    ):
        return False
    return not cached or {"block_table", "seqused_k"} <= _VARLEN_ARGS


def index_copy_kv(
    kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k/v [T, Hkv, D] into kv_cache [2, num_blocks, block_size, Hkv, D] at their flat slots
    with torch's index_copy_: one launch when v follows k in each row of one buffer (the merged
    q/k/v GEMM's output), else one each. The path off CUDA (and on it before `cache_write`)."""
    cache = kv_cache.flatten(1, 2)  # [2, num_blocks * block_size, Hkv, D], a view
    pair = kv_pair(k, v)
    if pair is not None and pair.dtype == cache.dtype:
        cache.transpose(0, 1).index_copy_(0, slot_mapping, pair)
        return
    cache[0].index_copy_(0, slot_mapping, k.to(cache.dtype))
    cache[1].index_copy_(0, slot_mapping, v.to(cache.dtype))


@functools.cache
def _kernels(module: str):
    """energon.parallel.<module> (a Triton kernel's module), imported on first CUDA use; None
    without triton."""
    try:
        return importlib.import_module(f"energon.parallel.{module}")
    except ImportError:
        return None


def paged_usable(q: torch.Tensor, meta: BatchMeta, num_heads: int, num_kv_heads: int) -> bool:
    """Whether the Triton paged kernel can run this cached step: triton installed, CUDA,
    fp16/bf16 and a decode-like query side (few new tokens per sequence)."""
    if not q.is_cuda or meta.block_tables is None:
        return False
    kernels = _kernels("paged_attention")
    return kernels is not None and kernels.supports(
        q, meta.max_seqlen_q, num_heads, num_kv_heads, q.shape[-1]
    )


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes of all heads (Press et al.; BLOOM's recipe for non-powers of two), float32 [H]."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra_base ** (2 * i + 1) for i in range(num_heads - closest)]
    return torch.tensor(slopes, dtype=torch.float32, device="cpu")  # never on meta (model building)


class Attention(nn.Module):
    """Causal multi-head attention of THIS rank's heads over a packed batch.

    `alibi_slopes` are this rank's heads' slopes (float [H]) or None. `kv_cache` is set by the
    runner to a [2, num_blocks, block_size, num_kv_heads, head_dim] tensor, or left None.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        alibi_slopes: torch.Tensor | None = None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.alibi_slopes = alibi_slopes  # plain attribute: never a checkpoint tensor
        self.kv_cache: torch.Tensor | None = None
        self.use_flash = True  # tests turn these off to compare against the SDPA grid path
        self.use_paged = True

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: BatchMeta
    ) -> torch.Tensor:
        """q [T, H*D], k/v [T, Hkv*D] → [T, H*D]."""
        T = q.shape[0]
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        cached = self.kv_cache is not None and meta.slot_mapping is not None
        if cached and not meta.fresh and meta.parts is None and self._takes_paged(q, meta):
            out = self._paged(q, meta, new_kv=(k, v))  # writes k/v into the cache, then attends
            return out.reshape(T, self.num_heads * self.head_dim)
        if cached:
            self._write_cache(k, v, meta.slot_mapping)
            # A fresh prefill's keys are exactly its new tokens: attend to them directly (flash
            # needs no paged-cache support then), the cache only keeps them for later steps.
            cached = not meta.fresh
        if cached and meta.parts is not None:  # decodes, prompt chunks, fresh prompts
            ends = [start for start, _, _ in meta.parts[1:]] + [T]
            out = torch.cat(
                [
                    self._attend(q[a:b], k[a:b], v[a:b], part, reads_cache)
                    for (a, part, reads_cache), b in zip(meta.parts, ends, strict=True)
                ]
            )
        else:
            out = self._attend(q, k, v, meta, cached)
        return out.reshape(T, self.num_heads * self.head_dim)

    def _attend(self, q, k, v, meta: BatchMeta, cached: bool) -> torch.Tensor:
        """q [T, H, D] of `meta`'s tokens (k/v [T, Hkv, D]) → [T, H, D], reading the cache
        when `cached`, by the fastest path this call allows. New prompts whose K/V the cache
        holds already (`_holds_new_kv`) but that flash cannot take (ALiBi)
        read them back through the prefill kernel rather than build the grid path's float mask
        of [B, H, L, L] (1.3 GB a layer for one 4,096-token prompt in fp16)."""
        if meta.padded_shape is not None and not cached:
            out = self._padded(q, k, v, meta)
        elif self.use_flash and flash_usable(q, self.alibi_slopes is not None, cached):
            try:
                out = self._flash(q, k, v, meta, cached)
            except (RuntimeError, TypeError):  # a page size or argument this build refuses
                self.use_flash = False
                out = self._varlen(q, k, v, meta, cached)
        elif cached and self._takes_paged(q, meta):
            out = self._paged(q, meta)
        elif (cached or self._holds_new_kv(meta)) and self._takes_paged_prefill(q):
            out = self._paged_prefill(q, meta)
        else:
            out = self._varlen(q, k, v, meta, cached)
        return out

    def _write_cache(self, k, v, slot_mapping):
        """k/v [T, Hkv, D] into their slots: on CUDA one Triton kernel (`cache_write`), else
        `index_copy_kv`."""
        kernels = _kernels("cache_write") if k.is_cuda else None
        if kernels is not None and kernels.supports(k, v, self.kv_cache, slot_mapping):
            kernels.write_kv(self.kv_cache, k, v, slot_mapping)
        else:
            index_copy_kv(self.kv_cache, k, v, slot_mapping)

    def _sdpa(self, q, k, v, mask, is_causal=False):
        """q [B, Lq, H, D], k/v [B, Lk, Hkv, D] → [B, Lq, H, D]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return out.transpose(1, 2)

    def _flash(self, q, k, v, meta, cached):
        """Flash varlen attention straight on the packed tokens: no grid, no mask, no pads."""
        cu_q = meta.cu_seqlens.to(torch.int32)
        extra = {"scale": self.scale, **_causal_kwargs()}
        if self.num_kv_heads != self.num_heads:
            if "enable_gqa" in _VARLEN_ARGS:
                extra["enable_gqa"] = True
            elif cached:  # an older varlen_attn: the grid path handles grouped heads
                return self._varlen(q, k, v, meta, cached)
            else:
                groups = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        if cached:
            extra["block_table"] = meta.block_tables.to(torch.int32)
            extra["seqused_k"] = meta.context_lens.to(torch.int32)
            keys, values = self.kv_cache[0], self.kv_cache[1]
            return _varlen_attn(
                q,
                keys.to(q.dtype),
                values.to(q.dtype),
                cu_q,
                None,
                meta.max_seqlen_q,
                meta.max_context_len,
                **extra,
            )
        return _varlen_attn(q, k, v, cu_q, cu_q, meta.max_seqlen_q, meta.max_seqlen_q, **extra)

    def _takes_paged(self, q, meta: BatchMeta) -> bool:
        """Whether a cached call of `meta`'s tokens goes to the Triton paged kernel: flash
        (where this torch reads a paged cache) comes first, as in `_attend`."""
        if self.use_flash and flash_usable(q, self.alibi_slopes is not None, True):
            return False
        return self.use_paged and paged_usable(q, meta, self.num_heads, self.num_kv_heads)

    def reads_shared_prefixes(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether decode steps on `device` in `dtype` go to the Triton paged kernel, which
        reads a group's shared prefix once when the step's `meta.shared` says so."""
        probe = torch.empty(1, self.num_heads, self.head_dim, dtype=dtype, device=device)
        meta = BatchMeta.for_step([1], [1], [[0]], 1)
        return self._takes_paged(probe, meta)

    def _takes_paged_prefill(self, q) -> bool:
        """Whether a call that reads the cache but is not decode-like goes to the Triton prefill
        kernel (when flash cannot take it): triton installed, CUDA, fp16/bf16."""
        kernels = _kernels("paged_prefill") if q.is_cuda and self.use_paged else None
        return kernels is not None and kernels.supports(q, self.head_dim)

    def _holds_new_kv(self, meta: BatchMeta) -> bool:
        """Whether the cache holds `meta`'s new K/V (`forward` wrote them at its slots) and
        its tables say where: new prompts can read them back."""
        return (
            self.kv_cache is not None
            and meta.slot_mapping is not None
            and meta.block_tables is not None
        )

    def _paged_prefill(self, q, meta):
        """Many new tokens a sequence after cached ones: the Triton kernel reads K/V through the
        block tables (the cache holds the new ones already), no gather into a grid."""
        return _kernels("paged_prefill").paged_prefill(
            q,
            self.kv_cache,
            meta.block_tables,
            meta.context_lens,
            meta.cu_seqlens,
            meta.max_seqlen_q,
            self.scale,
            alibi_slopes=self._device_slopes(q.device),
        )

    def _paged(self, q, meta, new_kv=None):
        """Decode-like step: the Triton kernel reads K/V through the block tables, no gather;
        given `new_kv` it writes them into the cache first (no separate cache write)."""
        return _kernels("paged_attention").paged_attention(
            q,
            self.kv_cache,
            meta.block_tables,
            meta.context_lens,
            meta.cu_seqlens,
            meta.max_seqlen_q,
            meta.max_context_len,
            self.scale,
            alibi_slopes=self._device_slopes(q.device),
            new_kv=new_kv,
            slot_mapping=meta.slot_mapping if new_kv is not None else None,
            shared=meta.shared,
        )

    def _device_slopes(self, device):
        """The ALiBi slopes on `device`, copied there once (no host copy every step)."""
        if self.alibi_slopes is None:
            return None
        source, copy = getattr(self, "_slopes_copy", (None, None))
        if source is not self.alibi_slopes or copy.device != device:
            copy = self.alibi_slopes.to(device, torch.float32)
            self._slopes_copy = (self.alibi_slopes, copy)
        return copy

    def _mask(self, q_pos, k_pos, allowed, dtype):
        """Boolean mask, or a float one carrying the ALiBi bias; [B, 1 or H, Lq, Lk]."""
        if self.alibi_slopes is None:
            return allowed.unsqueeze(1)
        slopes = self._device_slopes(q_pos.device)  # no host copy: a graph may capture this
        rel = (k_pos[:, None, :] - q_pos[:, :, None]).to(torch.float32)  # [B, Lq, Lk]
        bias = slopes[None, :, None, None] * rel[:, None]
        bias = bias.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        return bias.to(dtype)

    def _padded(self, q, k, v, meta):
        B, L = meta.padded_shape
        q, k, v = (x.view(B, L, *x.shape[1:]) for x in (q, k, v))
        if self.alibi_slopes is None:
            return self._sdpa(q, k, v, None, is_causal=True).reshape(B * L, self.num_heads, -1)
        pos = torch.arange(L, device=q.device).expand(B, L)
        allowed = pos[:, None, :] <= pos[:, :, None]
        mask = self._mask(pos, pos, allowed, q.dtype)
        return self._sdpa(q, k, v, mask).reshape(B * L, self.num_heads, -1)

    def _varlen(self, q, k, v, meta, cached):
        T, device = q.shape[0], q.device
        B, Lq = meta.num_seqs, meta.max_seqlen_q
        cu = meta.cu_seqlens.long()
        token = torch.arange(T, device=device)
        seq = torch.searchsorted(cu[1:], token, right=True)  # sequence of each packed token
        row = token - cu[seq]  # its row in that sequence's new tokens
        grid_q = q.new_zeros(B, Lq, self.num_heads, self.head_dim)
        grid_q[seq, row] = q
        q_pos = torch.zeros(B, Lq, dtype=torch.int64, device=device)  # pad rows see key 0 only
        q_pos[seq, row] = meta.positions
        if cached:
            Lk = meta.max_context_len
            cache = self.kv_cache.flatten(1, 2)
            block_size = self.kv_cache.shape[2]
            blocks = meta.block_tables[:, : -(-Lk // block_size)].long()
            slots = blocks[:, :, None] * block_size + torch.arange(block_size, device=device)
            slots = slots.flatten(1)[:, :Lk]  # [B, Lk]: cache slot of each key position
            keys, values = cache[0][slots].to(q.dtype), cache[1][slots].to(q.dtype)
        else:  # keys are the new tokens themselves, at positions 0..len-1
            Lk = Lq
            keys = k.new_zeros(B, Lk, self.num_kv_heads, self.head_dim)
            values = torch.zeros_like(keys)
            keys[seq, row] = k
            values[seq, row] = v
        k_pos = torch.arange(Lk, device=device).expand(B, Lk)
        allowed = (k_pos[:, None, :] <= q_pos[:, :, None]) & (
            k_pos[:, None, :] < meta.context_lens.long()[:, None, None]
        )
        out = self._sdpa(grid_q, keys, values, self._mask(q_pos, k_pos, allowed, q.dtype))
        return out[seq, row]
