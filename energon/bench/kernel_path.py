"""What a profiled step waited for, kernel by kernel, when its kernels overlap.

With programmatic dependent launches (energon/kernels/chain.py) a kernel starts while the one
before it still runs and waits inside it for that one to end, so a profile's kernel durations
include those waits: their sum exceeds the step (a tp=2 batch-1 decode step: 8.8 ms of kernels
in a 7.1 ms span), and a GEMV that started early looks slower than it is. Here each kernel is
charged the time from the end of every kernel before it to its own end, the time the step
waited for it, and any gap before its start separately (the device idle). Charges and gaps sum
to the span from the first start to the last end.

`python bench/kernel_path.py TRACE.json ...` reads the chrome traces that `energon bench
generate --profile --profile-dir DIR` writes and prints this per kernel name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DEVICE_EVENTS = ("kernel", "gpu_memcpy", "gpu_memset")  # chrome trace categories on the device


@dataclass(frozen=True)
class Charge:
    name: str
    start: float
    duration: float  # as the profile has it, waits included
    charged: float  # the step's time spent waiting for this kernel
    gap: float  # the device idle just before it


def charges(kernels: Iterable[tuple[str, float, float]]) -> list[Charge]:
    """(name, start, duration) of a stream's kernels, any unit -> their charges in start order."""
    ordered = sorted(kernels, key=lambda k: k[1])
    out: list[Charge] = []
    frontier = ordered[0][1] if ordered else 0.0  # the latest end so far
    for name, start, duration in ordered:
        end = start + duration
        gap = max(0.0, start - frontier)
        charged = max(0.0, end - max(frontier, start))
        frontier = max(frontier, end)
        out.append(Charge(name, start, duration, charged, gap))
    return out


@dataclass
class NameTotal:
    calls: int = 0
    charged: float = 0.0
    duration: float = 0.0


def by_name(step: Iterable[Charge]) -> dict[str, NameTotal]:
    """Totals per kernel name, largest charge first."""
    totals: dict[str, NameTotal] = {}
    for c in step:
        t = totals.setdefault(c.name, NameTotal())
        t.calls += 1
        t.charged += c.charged
        t.duration += c.duration
    return dict(sorted(totals.items(), key=lambda kv: -kv[1].charged))


def trace_kernels(path: Path) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of the device events of a chrome trace (torch.profiler's
    export_chrome_trace)."""
    events = json.loads(Path(path).read_text())
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    return [
        (e["name"], float(e["ts"]), float(e["dur"]))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in DEVICE_EVENTS
    ]


def report(path: Path, width: int = 60) -> str:
    """A trace's kernels by name: calls, charged and profiled time (us), and the totals."""
    step = charges(trace_kernels(path))
    if not step:
        return f"{path}: no device events"
    span = max(c.start + c.duration for c in step) - step[0].start
    lines = [
        f"{path}: {len(step)} device events over {span:.1f} us: charged "
        f"{sum(c.charged for c in step):.1f}, idle {sum(c.gap for c in step):.1f}, "
        f"profiled durations {sum(c.duration for c in step):.1f}",
        f"{'calls':>6} {'charged us':>11} {'us/call':>8} {'profiled us':>12}  kernel",
    ]
    for name, t in by_name(step).items():
        lines.append(
            f"{t.calls:6d} {t.charged:11.1f} {t.charged / t.calls:8.2f} {t.duration:12.1f}  "
            f"{name[:width]}"
        )
    return "\n".join(lines)
