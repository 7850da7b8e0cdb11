"""Tensor-parallel layers. At tp=1 each is an ordinary Linear/Embedding.

Every parameter carries `weight_loader(param, reader)` that copies its shard of a checkpoint tensor
into `param.data`, and `shard_dim` (None = replicated). `reader` is the loader's view of one
checkpoint tensor: `.name`, `.shape`, `.dtype`, and `reader[slices]` reads only those slices.
Model files replace `weight_loader` for fused or transposed checkpoint tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from energon.errors import CheckpointError
from energon.kernels.gemv import linear, pushed_linear
from energon.parallel.allreduce import all_reduce, fast_all_reduce
from energon.parallel.partial_sum import PartialSum
from energon.parallel.topology import current_parallel


def divide(n: int, tp: int, what: str) -> int:
    """n // tp; raises CheckpointError naming `what` when tp does not divide n."""
    if n % tp:
        raise CheckpointError(f"tp={tp} does not divide {what}={n}; pick a tp that divides it")
    return n // tp


def default_weight_loader(param: nn.Parameter, reader) -> None:
    """Copy this rank's shard of `reader` along `param.shard_dim` (whole tensor when None).

    Raises CheckpointError naming the tensor when its full shape is not the expected one.
    """
    dim = getattr(param, "shard_dim", None)
    tp_size = getattr(param, "tp_size", 1)
    expected = list(param.shape)
    if dim is not None:
        expected[dim] *= tp_size
    if list(reader.shape) != expected:
        raise CheckpointError(
            f"tensor {reader.name}: expected shape {tuple(expected)}, found {tuple(reader.shape)}"
        )
    if dim is None:
        param.data.copy_(reader[...])
        return
    size = param.shape[dim]
    start = getattr(param, "tp_rank", 0) * size
    index = [slice(None)] * param.dim()
    index[dim] = slice(start, start + size)
    param.data.copy_(reader[tuple(index)])


def set_shard(param: nn.Parameter, shard_dim: int | None, tp_rank: int, tp_size: int) -> None:
    """Tag `param` with how it is sharded and give it the default weight loader."""
    param.shard_dim = shard_dim
    param.tp_rank = tp_rank
    param.tp_size = tp_size
    param.weight_loader = default_weight_loader


def _all_reduce(x: torch.Tensor, group, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of `x` over the tp group (+ bias), in place: one-shot for small messages once
    `enable_fast_all_reduce` set it up for the group, else NCCL / gloo."""
    if group is None:
        return x if bias is None else x + bias
    return all_reduce(x, group, bias)


class ColumnParallelLinear(nn.Module):
    """y = x @ W.T + b with the output features split over tp: weight [out/tp, in] → [T, out/tp]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        ps = current_parallel()
        self.tp_rank, self.tp_size = ps.tp_rank, ps.tp_size
        self.in_features = in_features
        self.out_features = divide(out_features, self.tp_size, "out_features")
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        set_shard(self.weight, 0, self.tp_rank, self.tp_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False)
            set_shard(self.bias, 0, self.tp_rank, self.tp_size)
        else:
            self.register_parameter("bias", None)
        # (weight, bias, rows per linear) of the linears merge_columns merged, on the first one
        self.merged: tuple[torch.Tensor, torch.Tensor | None, list[int]] | None = None

    @property
    def early_weights(self) -> bool:
        """At tp > 1 the layer's input comes from an all-reduce: its GEMV streams its weights
        while that runs (energon.kernels.gemv.linear's `early_weights`)."""
        return self.tp_size > 1

    def forward(self, x: torch.Tensor, activation=None) -> torch.Tensor:
        """x @ W.T + b, then `activation` (a function of one tensor) if given. ReLU is fused
        into the GEMM on half-precision 2-D cuda inputs (energon.kernels.gemv.linear)."""
        early = self.early_weights
        if activation is F.relu:
            return linear(x, self.weight, self.bias, relu=True, early_weights=early)
        y = linear(x, self.weight, self.bias, early_weights=early)
        return y if activation is None else activation(y)


def merge_columns(*linears: ColumnParallelLinear) -> None:
    """Moves the weights (and biases) of column-parallel linears that read the same input into
    one buffer, so that `merged(x, *linears)` runs them as one GEMM (fewer, larger GEMMs: at
    batch 1 a 3-way q/k/v GEMV reads its weights closer to full bandwidth than three do).

    Call after loading. Every parameter stays (a view into the buffer), with its name and values.
    """
    if len({lin.bias is None for lin in linears}) != 1:
        raise ValueError("merge_columns needs all linears with a bias or all without")
    weight = torch.cat([lin.weight for lin in linears])
    bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[start : start + rows]
        if bias is not None:
            lin.bias.data = bias[start : start + rows]
        start += rows
    linears[0].merged = (weight, bias, [lin.weight.shape[0] for lin in linears])


def merged(x: torch.Tensor, *linears: ColumnParallelLinear) -> tuple[torch.Tensor, ...]:
    """(lin(x) for lin in linears): one GEMM once `merge_columns(*linears)` ran, else one each.
    The outputs are column slices of one [T, sum] tensor then (strided rows)."""
    fused = linears[0].merged
    if fused is None:
        return tuple(lin(x) for lin in linears)
    weight, bias, splits = fused
    return linear(x, weight, bias, early_weights=linears[0].early_weights).split(splits, dim=-1)


class RowParallelLinear(nn.Module):
    """y = x @ W.T + b with the input features split over tp: partial product, all-reduce, + b
    (the all-reduce left to the norm after it: energon/parallel/partial_sum.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        ps = current_parallel()
        self.tp_rank, self.tp_size, self.group = ps.tp_rank, ps.tp_size, ps.tp_group
        self.in_features = divide(in_features, self.tp_size, "in_features")
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features), requires_grad=False)
        set_shard(self.weight, 1, self.tp_rank, self.tp_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            set_shard(self.bias, None, self.tp_rank, self.tp_size)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor | PartialSum:
        """x @ W.T + b. At tp > 1 the sum over the group is left to whoever uses it: a
        `PartialSum`, which the norm after it sums in its own kernel (`add_norm`), and which
        `sum()` or `+` turn into the tensor."""
        if self.tp_size == 1:
            return linear(x, self.weight, self.bias)  # bias fused into the GEMM epilogue
        if self.group is None:
            return _all_reduce(linear(x, self.weight, early_weights=True), None, self.bias)
        push = self._push_for(x)
        if push is not None and (partial := pushed_linear(x, self.weight, push)) is not None:
            return PartialSum(partial, self.bias, self.group, pushed=True)
        return PartialSum(linear(x, self.weight, early_weights=True), self.bias, self.group)

    def _push_for(self, x: torch.Tensor):
        """Where this layer's GEMV pushes its product for the fused all-reduce + norm, or None
        (energon/parallel/partial_sum.py)."""
        fast = fast_all_reduce(self.group)
        if fast is None or x.dim() != 2 or (self.bias is not None and self.bias.dtype != x.dtype):
            return None
        return fast.push_for(x.shape[0], self.out_features, x.dtype)


class VocabParallelEmbedding(nn.Module):
    """Embedding with the vocabulary rows split over tp: own rows looked up, others 0, all-reduce."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        ps = current_parallel()
        self.tp_rank, self.tp_size, self.group = ps.tp_rank, ps.tp_size, ps.tp_group
        self.num_embeddings = num_embeddings
        self.rows = divide(num_embeddings, self.tp_size, "vocab_size")
        self.start = self.tp_rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim), requires_grad=False)
        set_shard(self.weight, 0, self.tp_rank, self.tp_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        mine = (local >= 0) & (local < self.rows)
        out = F.embedding(local.clamp(0, self.rows - 1), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return _all_reduce(out, self.group)


class ParallelLMHead(nn.Module):
    """Logits h @ W.T (+ b) with vocabulary rows split over tp, all-gathered to [N, V] on every rank."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False):
        super().__init__()
        ps = current_parallel()
        self.tp_rank, self.tp_size, self.group = ps.tp_rank, ps.tp_size, ps.tp_group
        self.num_embeddings = num_embeddings
        self.rows = divide(num_embeddings, self.tp_size, "vocab_size")
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim), requires_grad=False)
        set_shard(self.weight, 0, self.tp_rank, self.tp_size)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.rows), requires_grad=False)
            set_shard(self.bias, 0, self.tp_rank, self.tp_size)
        else:
            self.register_parameter("bias", None)

    def tie(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (same rows on this rank). A stage that keeps only the head
        still holds the shared Parameter; the loader then reads the embedding's checkpoint tensor."""
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(
                f"cannot tie lm head {tuple(self.weight.shape)} to embedding {tuple(embedding.weight.shape)}"
            )
        self.weight = embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight, self.bias)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
