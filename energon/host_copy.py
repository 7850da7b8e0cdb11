"""Small host values onto the device without the host waiting for the device.

`torch.tensor(values, device="cuda")` copies synchronously: the host waits until every kernel
already queued on the stream has run. A worker that queues step k+1 while step k runs must never
do that, or the device idles while the host issues the rest of the step. Here the values go
through pinned memory and the copy is queued like a kernel.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a 1-d tensor of `dtype` on `device`; on CUDA the copy is queued on the current
    stream and the call returns at once."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
