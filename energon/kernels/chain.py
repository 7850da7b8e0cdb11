"""How a decode step's Triton kernels chain as programmatic dependent launches (Hopper+).

A kernel launched as a programmatic dependent launch may start while the kernel before it
still runs: once every program of that one has called `gdc_launch_dependents` (or exited).
Until it calls `gdc_wait` it may only read what no unfinished kernel writes (weights, the
step's lengths, buffer addresses) and write nothing; after the wait, the kernel before has
finished and its writes are visible.

Every kernel of the chain releases its dependents right after its own wait, never before: so
the next kernel starts while this one works, but the one after that only once this one's
predecessor has finished. The chain runs at most one kernel ahead. (Releasing first thing, as
765ced1 did, let the kernels of many layers ahead start, prefetch and wait at once, and made
tp > 1 decode slower: docs/benchmarks.md, "Engine generation".) It also means a kernel may read,
before its wait, what the kernel two before it wrote.

Kernels launched plainly (PDL false: CPU, the interpreter, before Hopper, ENERGON_PDL=0) wait
for the kernel before them as usual and release nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from energon.kernels import dependent_launch


@triton.jit
def wait_then_release(PDL: tl.constexpr):
    """With PDL: wait for the kernel before this one to finish, then let the next one start."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """A chained kernel's launch keywords: its PDL constexpr and, when `pdl`, the launch as a
    programmatic dependent launch (one value for both, so they cannot disagree)."""
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def chained(device: torch.device) -> dict:
    """`launch_options` for a kernel on `device`, as `dependent_launch` decides."""
    return launch_options(dependent_launch(device))
