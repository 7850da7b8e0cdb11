"""What the step graphs (decode_graphs.py, prefill_graphs.py) share: `StepGraphs`, the stage
input buffer, one graph per bucket and the replay, and pinned staging for their inputs.

A graph reads its inputs from static device buffers; each step writes its host-built index
tensors (positions, cache slots, lengths) into pinned memory and copies them over without
blocking. `StagingRing` holds several such pinned sets and hands out the next one only once the
copies out of it, issued `len(ring)` steps ago, have left it: with one set, each step's host part
waited for the step before last to finish on the device, and on a later pipeline stage (whose
work waits for its input) the worker sat blocked there while replies of finished steps waited.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from energon.kernels.argmax import argmax


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


class StepGraphs:
    """One CUDA graph of the stage body `body(x[:bucket], self._meta(bucket))` per bucket of row
    counts, replayed for steps that fit. `x` is the stage's input buffer: int64 token ids [n]
    on the first stage, activations [n, hidden] of `dtype` elsewhere (n: the largest bucket).
    `block_size` / `scratch_block` describe the KV cache (the scratch block takes the pad rows'
    K/V). A subclass writes each step's inputs into its own static buffers, gives
    `_meta(bucket)` (views of them) and calls `_capture()` (CUDA) or leaves the graphs
    uncaptured: `_replay` then runs the body on the same buffers eagerly (the cpu tests).
    With `greedy` (a last stage: the body's output is logits) the graph also takes each row's
    argmax (energon/kernels/argmax.py); `tokens` holds the latest step's, for its rows."""

    def __init__(
        self,
        body: Callable,
        *,
        first_stage: bool,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int,
        scratch_block: int,
        buckets: tuple[int, ...],
        unit: str,
        greedy: bool = False,
    ):
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive {unit} (got {buckets})")
        self.body = body
        self.device = device
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.buckets = tuple(sorted(set(buckets)))
        n = self.buckets[-1]
        if first_stage:
            self.x = torch.zeros(n, dtype=torch.int64, device=device)
        else:
            self.x = torch.zeros(n, hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # with `greedy` (a last stage's logits out): each output row's argmax, computed in the
        # graph after the body; `tokens` the latest step's, for the rows it ran
        self.greedy = greedy
        self._tokens: dict[int, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None
        self.captured = False
        self.steps = 0  # steps that took this path

    def _meta(self, bucket: int):
        raise NotImplementedError

    def _bucket(self, rows: int) -> int:
        """The smallest bucket that holds `rows`."""
        return next(b for b in self.buckets if b >= rows)

    def _replay(self, bucket: int, rows: int, receive: Callable | None) -> torch.Tensor:
        """One step whose inputs are staged: a later stage's `receive` fills its `rows` input
        rows of `x` in place first; returns the whole bucket's output (a static buffer once
        captured, valid until the next replay)."""
        self.steps += 1
        if receive is not None:
            receive(self.x[:rows])
        if self.captured:
            self.graphs[bucket].replay()
            out = self.outputs[bucket]
            self.tokens = self._tokens[bucket][:rows] if self.greedy else None
            return out
        out = self.body(self.x[:bucket], self._meta(bucket))
        self.tokens = argmax(out[:rows]) if self.greedy else None
        return out

    def _capture(self, prepare: Callable[[int], None] | None = None) -> None:
        """One graph per bucket, largest first, all in one memory pool (smaller graphs reuse
        its blocks; a graph's output stays its own). Each bucket runs twice eagerly first
        (compiles kernels, settles allocator and library state), after `prepare(bucket)`, which
        sets the static inputs for it outside the graph."""
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # No garbage collection while capturing: a collection that frees an unreachable
        # CUDAGraph (one dropped earlier in this process) destroys it mid-capture, which CUDA
        # forbids, and the capture is lost (seen once on an H200 in the GPU suite, where many
        # runners come and go). What is already garbage goes first.
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            with torch.cuda.stream(side):
                for bucket in reversed(self.buckets):
                    if prepare is not None:
                        prepare(bucket)
                    meta = self._meta(bucket)
                    for _ in range(2):
                        out = self.body(self.x[:bucket], meta)
                        if self.greedy:
                            argmax(out)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(
                        graph, pool=pool, stream=side, capture_error_mode="thread_local"
                    ):
                        self.outputs[bucket] = out = self.body(self.x[:bucket], meta)
                        if self.greedy:
                            self._tokens[bucket] = argmax(out)
                    self.graphs[bucket] = graph
        finally:
            if collecting:
                gc.enable()
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        self.captured = True
