"""A sync actor method's result that a device is still computing.

A method that launches work on a GPU and would then block until it finishes (to read the result
back) can instead return `Deferred(result, wait)`. The worker hands `wait` to a helper thread and
goes on with the calls already waiting, so the next GPU step is queued behind this one instead of
after its reply; once `wait()` returns it replies with `result()`, before it starts another call
that is waiting. Replies still go out in call order, and `result()` runs on the thread that runs
the actor's methods.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Deferred:
    """`result()` is the method's reply, valid once `wait()` (None: nothing to wait for) has
    returned. An exception from either becomes the call's error reply."""

    __slots__ = ("result", "wait", "error")

    def __init__(self, result: Callable[[], Any], wait: Callable[[], None] | None = None):
        self.result = result
        self.wait = wait
        self.error: BaseException | None = None  # what wait() raised

    def reply(self) -> Any:
        """The result (raises what wait() or result() raised)."""
        if self.error is not None:
            raise self.error
        return self.result()
