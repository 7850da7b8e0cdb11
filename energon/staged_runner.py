"""A ModelRunner built in two calls, so that the Engine can tell spawning from loading.

`StagedRunner(**kwargs)` only keeps its arguments (the worker process is up and answering);
`load()` then runs `ModelRunner.__init__(**kwargs)`: it joins the process groups, builds this
rank's stage and loads its shards. The controller calls `load` on every rank at once and sees each
rank finish on its own, which is what the start-up progress shows. After `load` it is a
ModelRunner in every way.
"""

from __future__ import annotations

import time

from energon.runner import ModelRunner


class StagedRunner(ModelRunner):
    """`StagedRunner(**ModelRunner kwargs)`, then `load()` on every rank."""

    def __init__(self, **kwargs):  # the real construction is load()
        self._kwargs = kwargs

    def load(self) -> dict:
        """Builds and loads this rank's stage; returns {"rank", "layers" [start, stop),
        "tensors", "bytes", "seconds"}. Raises what ModelRunner raises (CheckpointError, ...)."""
        t0 = time.perf_counter()
        ModelRunner.__init__(self, **self._kwargs)
        return {
            "rank": self.state.rank,
            "layers": [self.layer_range.start, self.layer_range.stop],
            "tensors": self.report.tensors,
            "bytes": self.report.bytes,
            "seconds": time.perf_counter() - t0,
        }
