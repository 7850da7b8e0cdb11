"""Counters for "the last program to finish combines": one zeroed int32 buffer per device.

A kernel whose programs each leave a partial result takes a ticket (an atomic add) once its
partial is stored; the program that draws the last ticket combines the partials and puts the
counter back to zero. Kernels on one device share the buffer: each leaves its counters at zero
and they never run at once (one stream, and a dependent launch touches its counters only after
its wait for the kernel before).
"""

from __future__ import annotations

import torch

_BUFFERS: dict[torch.device, list[torch.Tensor]] = {}


def tickets(device: torch.device, n: int, who: str) -> torch.Tensor:
    """At least `n` zeroed counters on `device`, kept (each call leaves them at zero again),
    grown outside graph capture (`who`, the kernel, is named in the error). A grown buffer
    never frees the one before it: CUDA graphs captured earlier still use it."""
    buffers = _BUFFERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"{who} needs {n} counters while a CUDA graph is captured; "
                "run the same call once before capturing"
            )
        buffers.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return buffers[-1]
