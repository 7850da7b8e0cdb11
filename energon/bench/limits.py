"""The card's physical ceilings, measured in the run that uses them (BENCHMARKS.md, baseline 1).

`matmul_rate`: a large square matrix product on seeded random data, FLOP/s.
`copy_bandwidth`: a device-to-device copy, counting bytes read plus bytes written, bytes/s.
Both warm up first, synchronise around each timed repetition and return the median.
`step_floor`: the least time one model step can take on a card with those ceilings.
"""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on cpu)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def matmul_rate(
    device: torch.device, dtype: torch.dtype, size: int, warmup: int = 3, repeat: int = 20
) -> float:
    """FLOP/s of a [size, size] @ [size, size] product (2 size^3 FLOPs) in `dtype`, median."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = _median_seconds(lambda: torch.mm(a, b, out=out), device, warmup, repeat)
    return 2 * size**3 / seconds


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int = 3, repeat: int = 20) -> float:
    """Bytes/s of a device-to-device copy of `nbytes` (read + written = 2 * nbytes), median."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), device, warmup, repeat)
    return 2 * nbytes / seconds


def step_floor(
    tokens: float,
    attended: float,
    mparams: float,
    weights: float,
    kv_tok: float,
    rate: float,
    bandwidth: float,
) -> float:
    """Seconds one step of `tokens` new tokens attending over `attended` KV tokens takes at
    least: max(2 * matmul params * tokens / matmul rate, (weight bytes + attended x KV bytes per
    token) / bandwidth), the step-wise roofline of the benches."""
    return max(2 * mparams * tokens / rate, (weights + kv_tok * attended) / bandwidth)
