"""When a device reached a point of its work, in perf_counter seconds, without waiting for it.

A bench worker that synchronised its device to time each step would hold its host back until the
step ended: the next step could not be queued behind it, so pipeline stages and tp ranks other
than the one that replies would run one step at a time, and the timing would change what it
times. `DeviceClock.mark()` instead records a CUDA event on the current stream (on cpu, where work
is synchronous, it reads the clock); `seconds(marks)` later waits for them and places each on the
host's perf_counter timeline through an anchor event recorded on an idle device. perf_counter is
CLOCK_MONOTONIC, so marks of several worker processes on one host share a timeline.
"""

from __future__ import annotations

import time

import torch

Mark = float | torch.cuda.Event


class DeviceClock:
    """`mark()` now, `seconds(marks)` once the device has passed them."""

    def __init__(self, device: torch.device):
        self.device = device
        self._anchor: tuple[torch.cuda.Event, float] | None = None

    def mark(self) -> Mark:
        """The point the current stream has reached (cpu: the time now)."""
        if self.device.type != "cuda":
            return time.perf_counter()
        if self._anchor is None:
            self._set_anchor()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, marks: list[Mark]) -> list[float]:
        """perf_counter seconds at which the device passed each mark; waits for the device.
        Then re-anchors, so that drift between the two clocks never builds up over a long run:
        resolve every outstanding mark in one call."""
        if self.device.type != "cuda" or not marks:
            return [float(m) for m in marks]
        torch.cuda.synchronize(self.device)
        event, t = self._anchor
        out = [t + event.elapsed_time(m) / 1e3 for m in marks]
        self._set_anchor()
        return out

    def _set_anchor(self) -> None:
        # on an idle device an event is reached as soon as it is recorded
        torch.cuda.synchronize(self.device)
        event = torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        event.record()
        torch.cuda.synchronize(self.device)
        self._anchor = (event, t)
