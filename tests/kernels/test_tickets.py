"""The counters of "the last program combines" kernels (energon/kernels/tickets.py)."""

from __future__ import annotations

import torch

from energon.kernels import tickets as module


def test_counters_grow_without_freeing_what_graphs_hold():
    device = torch.device("cpu")
    small = module.tickets(device, 10, "test")
    assert small.numel() >= 10 and not small.any()
    assert module.tickets(device, 10, "test") is small  # kept, not reallocated
    big = module.tickets(device, small.numel() + 1, "test")
    assert big is not small and big.numel() > small.numel() and not big.any()
    assert module.tickets(device, 10, "test") is big
    assert any(b is small for b in module._BUFFERS[device])  # still referenced: a graph may use it
