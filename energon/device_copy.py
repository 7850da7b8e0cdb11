"""Host -> device copies that never make the host wait for the GPU.

A copy from pageable host memory (`tensor.to("cuda")`, even with non_blocking=True) first waits
for every kernel already queued on the stream: the driver stages it through a pinned buffer of
its own after a stream sync. A worker that issues step k+1 while step k runs would so wait for
step k to end and then leave its GPU idle while it issues step k+1. Staged in pinned memory
instead (torch's caching host allocator keeps the block until the copy's stream event has
completed), the copy is queued like a kernel and the host runs ahead.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`t` (on the host) on `device`, without blocking the host on CUDA."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def host_tensor(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A small tensor of host `values` (a list) on `device`, without blocking the host."""
    return to_device(torch.tensor(values, dtype=dtype), device)
