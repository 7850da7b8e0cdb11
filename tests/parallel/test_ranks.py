"""run_ranks (energon/parallel/ranks.py): a rank's result reaches the parent whole, even when the
parent reads it only after the rank has exited."""

from __future__ import annotations

import operator
import time

import torch

from energon.parallel import ranks
from energon.parallel.ranks import run_ranks
from energon.parallel.topology import Topology


def tensors(state) -> dict:
    return {"rank": state.rank, "x": torch.arange(6.0).view(2, 3) * (state.rank + 1)}


class LateQueue:
    """The parent's end of run_ranks' queue, reading each message 2 s late (by then every rank
    has sent its result and exited); a rank gets the plain queue."""

    def __init__(self, queue):
        self.queue = queue

    def __reduce__(self):  # what a spawned rank unpickles: the queue itself
        return operator.itemgetter(0), ([self.queue],)

    def get(self, timeout=None):
        time.sleep(2)
        return self.queue.get(timeout=timeout)


def test_a_tensor_result_survives_its_rank_exiting_before_the_parent_reads_it(monkeypatch):
    real = ranks.mp.get_context

    def late_context(method):
        ctx = real(method)
        queue = ctx.Queue

        class Context:
            def __getattr__(self, name):
                return getattr(ctx, name)

            def Queue(self):  # noqa: N802 - the context's own name
                return LateQueue(queue())

        return Context()

    monkeypatch.setattr(ranks.mp, "get_context", late_context)
    results = run_ranks(tensors, Topology(2), "cpu", timeout=60)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert torch.equal(r["x"], torch.arange(6.0).view(2, 3) * (r["rank"] + 1))
