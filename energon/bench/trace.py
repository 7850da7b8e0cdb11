"""Per-stage timelines of a pipelined run: how much the stages overlap, and a PNG that shows it.

Each worker logs (start, input received, end) per step (`TimedStagedRunner.step_trace`): when its
device got to each point (energon/bench/device_clock.py). A later stage first waits for its
input, then works. A span is "work" from the input's arrival to the end (for the first stage,
from the start). Stages overlap when two of them work at the same time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

Span = tuple[float, float, float]  # start, input received, end (perf_counter seconds)


def work_spans(trace: Sequence[Span]) -> list[tuple[float, float]]:
    return [(max(t0, t_in), t1) for t0, t_in, t1 in trace if t1 > max(t0, t_in)]


def overlap_fraction(stage_traces: Sequence[Sequence[Span]]) -> float:
    """The fraction of the run's time (first start to last end) during which at least two
    stages work at once. 0 for one stage or an empty run."""
    events = []
    for stage, trace in enumerate(stage_traces):
        for a, b in work_spans(trace):
            events += [(a, 1, stage), (b, -1, stage)]
    if len(stage_traces) < 2 or not events:
        return 0.0
    events.sort(key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    busy, both, last = 0, 0.0, events[0][0]
    for t, delta, _ in events:
        if busy >= 2:
            both += t - last
        busy, last = busy + delta, t
    starts = [t0 for trace in stage_traces for t0, _, _ in trace]
    ends = [t1 for trace in stage_traces for _, _, t1 in trace]
    total = max(ends) - min(starts)
    return both / total if total > 0 else 0.0


def steady_window(stage_traces: Sequence[Sequence[Span]], steps: int = 12) -> tuple[float, float]:
    """A window of `steps` of the last stage's steps from the middle of the run."""
    last = sorted(stage_traces[-1])
    if not last:
        return 0.0, 0.0
    mid = max(0, len(last) // 2 - steps // 2)
    chosen = last[mid : mid + steps]
    return chosen[0][0], chosen[-1][2]


def timeline_png(
    panels: Sequence[tuple[str, Sequence[Sequence[Span]]]], path: str | Path, steps: int = 12
) -> Path:
    """Draws one panel per (title, per-stage traces): a row per stage, waiting in light grey and
    work in a colour per stage, over a steady window of `steps` steps. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = sum(1.3 + 0.45 * len(stages) for _, stages in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, height))
    axes = [axes] if len(panels) == 1 else list(axes)
    colours = plt.get_cmap("tab10")
    for ax, (title, stages) in zip(axes, panels, strict=True):
        lo, hi = steady_window(stages, steps)
        for row, trace in enumerate(stages):
            for t0, t_in, t1 in trace:
                if t1 < lo or t0 > hi:
                    continue
                if t_in > t0:
                    ax.broken_barh([(t0 - lo, t_in - t0)], (row - 0.35, 0.7), color="0.85")
                start = max(t0, t_in)
                ax.broken_barh([(start - lo, t1 - start)], (row - 0.35, 0.7), color=colours(row))
        ax.set_xlim(0, max(hi - lo, 1e-9))
        ax.set_yticks(range(len(stages)), [f"stage {s}" for s in range(len(stages))])
        ax.invert_yaxis()
        ax.set_xlabel("seconds (grey: waiting for the previous stage; colour: working)")
        ax.set_title(f"{title}: overlap {overlap_fraction(stages):.0%} of the run", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def median_or_none(xs: Sequence[float]) -> float | None:
    """The median of xs, None when there are none."""
    import statistics

    return statistics.median(xs) if xs else None


def turnaround(
    stage_traces: Sequence[Sequence[Span]], controller: Sequence[Sequence[float]]
) -> dict | None:
    """Where a micro-batch's time between two of its steps goes, medians in seconds, from the
    first and last stages' traces and the controller's [sent, reply in, reply applied] of the
    same steps (`TimedEngine.controller_trace`; all in step order, one perf_counter clock):

    reply:   the last stage's output computed -> its reply in the controller's hands (sampling,
             the copy back, ZeroMQ, and waiting while the controller handles another reply)
    control: reply in -> the next step sent (the controller's own turnaround)
    apply:   reply in -> done with it (the next steps sent, then every request's token taken)
    deliver: step sent -> the first stage starting it, counted when it was sent after that stage
             was done with the step before (so the stage waited for it)
    busy:    the controller's share of the run spent applying replies

    None when the traces do not pair up (another count of steps)."""
    import bisect

    first, last = stage_traces[0], stage_traces[-1]
    if not controller or len(first) != len(controller) or len(last) != len(controller):
        return None
    sent = sorted(c[0] for c in controller)
    reply, control, apply, deliver = [], [], [], []
    for i, (t_sent, t_in, t_done) in enumerate(controller):
        reply.append(t_in - last[i][2])
        apply.append(t_done - t_in)
        at = bisect.bisect_left(sent, t_in)  # the first step sent once this reply was in
        if at < len(sent):
            control.append(sent[at] - t_in)
        if i and t_sent > first[i - 1][2]:  # sent after the stage was done: it waited
            deliver.append(first[i][0] - t_sent)
    wall = max(c[2] for c in controller) - min(sent)
    return {
        "reply_s": median_or_none(reply),
        "control_s": median_or_none(control),
        "apply_s": median_or_none(apply),
        "deliver_s": median_or_none(deliver),
        "busy": sum(apply) / wall if wall > 0 else None,
        "steps": len(controller),
    }


def decode_steps(stage_traces: Sequence[Sequence[Span]], is_decode: Sequence[bool]) -> dict | None:
    """Where the steps that only decode go, stage by stage, medians in seconds (`is_decode`: per
    step, in step order, whether every sequence of it had one new token):

    work_s:  each stage's work (its input received -> its output computed)
    hop_s:   per boundary, the later stage's input received - the earlier stage's output
             computed: the transfer, or a queue where the later stage was still busy with the
             step before (the largest hop is in front of the slowest stage)

    With as many micro-batches in flight as stages, the stage with the longest work sets the pace
    of decoding; the first stage's work also holds its wait for the tokens handed back.
    None when the traces do not pair up or no step only decodes."""
    if not stage_traces or any(len(t) != len(is_decode) for t in stage_traces):
        return None
    steps = [i for i, flag in enumerate(is_decode) if flag]
    if not steps:
        return None
    work = [median_or_none([t[i][2] - max(t[i][0], t[i][1]) for i in steps]) for t in stage_traces]
    hops = [
        median_or_none([after[i][1] - before[i][2] for i in steps])
        for before, after in itertools.pairwise(stage_traces)
    ]
    return {"work_s": work, "hop_s": hops, "steps": len(steps)}
