"""What the step graphs (decode_graphs.py, prefill_graphs.py) share: pinned staging for their
inputs and the capture of one graph per bucket.

A graph reads its inputs from static device buffers; each step writes its host-built index
tensors (positions, cache slots, lengths) into pinned memory and copies them over without
blocking. `StagingRing` holds several such pinned sets and hands out the next one only once the
copies out of it, issued `len(ring)` steps ago, have left it: with one set, each step's host part
waited for the step before last to finish on the device, and on a later pipeline stage (whose
work waits for its input) the worker sat blocked there while replies of finished steps waited.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class StagingRing:
    """`count` sets of host tensors, each shaped and typed as `shapes` says (pinned on cuda),
    handed out in turn. `next()` -> (tensors, done): fill the tensors, issue the copies out of
    them, then call `done()`. Off cuda the copies are synchronous and one set suffices."""

    def __init__(self, shapes: list[tuple[tuple[int, ...], torch.dtype]], device, count: int):
        pinned = torch.device(device).type == "cuda"
        self.pinned = pinned
        self._sets = [
            (
                [torch.zeros(shape, dtype=dtype, pin_memory=pinned) for shape, dtype in shapes],
                torch.cuda.Event() if pinned else None,
            )
            for _ in range(count if pinned else 1)
        ]
        self._next = 0

    def __len__(self) -> int:
        return len(self._sets)

    def next(self) -> tuple[list[torch.Tensor], Callable[[], None]]:
        tensors, copied = self._sets[self._next]
        self._next = (self._next + 1) % len(self._sets)
        if copied is None:
            return tensors, lambda: None
        copied.synchronize()  # this set's last copies have left it
        return tensors, copied.record


def capture_buckets(
    buckets: tuple[int, ...],
    run: Callable[[int], torch.Tensor],
    device: torch.device,
    prepare: Callable[[int], None] | None = None,
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """One CUDA graph of `run(bucket)` per bucket, largest first, all in one memory pool
    (smaller graphs reuse its blocks; a graph's output stays its own). Each bucket runs twice
    eagerly first (compiles kernels, settles allocator and library state), after
    `prepare(bucket)`, which sets the static inputs for it outside the graph. Returns (graphs,
    outputs) by bucket."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for bucket in sorted(buckets, reverse=True):
            if prepare is not None:
                prepare(bucket)
            for _ in range(2):
                run(bucket)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                outputs[bucket] = run(bucket)
            graphs[bucket] = graph
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    return graphs, outputs
