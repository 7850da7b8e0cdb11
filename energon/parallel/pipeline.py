"""Pipeline stages: which layers each stage owns, and activations passed stage to stage.

Every worker receives step descriptions in the same order, so stage s's k-th send meets stage
s+1's k-th receive; the shape [T, hidden] is known to both sides from the step itself, so no
shape travels. Each tp rank sends its (replicated) activation to the same tp rank downstream,
over a process group of its own for that pair (`ParallelState.next_group` / `prev_group`): on
one communicator NCCL runs a rank's sends and receives one after another, so a stage's send of
micro-batch k would hold up its receive of k+1.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from energon.errors import InvalidRequest


def cut_stages(num_layers: int, pp: int, splits: list[int] | None = None) -> list[range]:
    """The layer range of each stage: even (earlier stages take the remainder) or `splits`.

    `splits` gives the number of layers per stage and must sum to num_layers.
    Raises InvalidRequest (a ValueError) naming `pp` or `stage_splits` when the cut is impossible:
    the Engine calls it before spawning workers, each worker when it builds its stage.
    """
    if splits is None:
        if pp > num_layers:
            raise InvalidRequest(
                "pp", f"must be <= the model's {num_layers} layers (pp={pp} is more than that)"
            )
        base, extra = divmod(num_layers, pp)
        splits = [base + (1 if s < extra else 0) for s in range(pp)]
    splits = list(splits)
    if len(splits) != pp or sum(splits) != num_layers or min(splits) < 1:
        raise InvalidRequest(
            "stage_splits",
            f"must be {pp} positive layer counts summing to {num_layers} layers, the model's "
            f"(got {splits})",
        )
    ranges, start = [], 0
    for n in splits:
        ranges.append(range(start, start + n))
        start += n
    return ranges


def send_activation(h: torch.Tensor, dst_rank: int, group=None) -> None:
    """Send `h` to `dst_rank` (a global rank) over `group` (None: the default group); blocking
    until the peer takes it on gloo, queued on NCCL."""
    dist.send(h.contiguous(), dst_rank, group=group)


def recv_activation(
    shape: tuple[int, ...], dtype: torch.dtype, src_rank: int, device: torch.device, group=None
) -> torch.Tensor:
    """Receive a tensor of `shape`/`dtype` from `src_rank` (a global rank) over `group`."""
    h = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(h, src_rank, group=group)
    return h
