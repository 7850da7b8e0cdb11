"""A test actor that hosts several ModelRunners (one per checkpoint) in one worker process.

Spawning a group per model family would start dozens of processes; the parity suite instead
starts one group per (tp, pp) layout whose workers each build a real ModelRunner for every
family, all sharing the worker's process group. Calls are forwarded unchanged.
"""

from __future__ import annotations

from energon.actors import actor_context
from energon.runner import ModelRunner


class RunnerSet:
    def __init__(self, models: dict[str, str], **runner_kwargs):
        rank = actor_context().rank
        self.runners = {
            name: ModelRunner(folder, rank=rank, **runner_kwargs) for name, folder in models.items()
        }

    def call(self, name: str, method: str, *args):
        """runners[name].method(*args)."""
        return getattr(self.runners[name], method)(*args)
