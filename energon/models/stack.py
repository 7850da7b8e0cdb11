"""The residual stream through a stack of decoder layers.

A decoder layer is called `layer(hidden, meta, residual) -> (out, residual)`, and what it
computes is `out + residual`: the sum is left to the next layer, whose first norm adds it
(`add_norm`: one kernel where an add and a norm were two; 40 fewer kernels in a 40-layer decode
step). `residual` is None into a stage's first layer, and a layer that sums its own output (a
post-LN layer) returns None for it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from energon.parallel.packing import BatchMeta


def run_layers(layers: Iterable[nn.Module], hidden: torch.Tensor, meta: BatchMeta) -> torch.Tensor:
    """`hidden` through `layers` in order; returns the last layer's output, summed."""
    residual = None
    for layer in layers:
        hidden, residual = layer(hidden, meta, residual)
    return hidden if residual is None else hidden + residual
