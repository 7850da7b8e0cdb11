"""Shared pieces of the launcher tests: one tiny random Llama checkpoint, the prompts every
launcher generates for, and starting `energon worker` processes.

Every multi-host run is compared with the one-host run (launcher="local", same tp/pp, same
prompts, greedy), which is itself checked against Hugging Face `generate` (conftest.py).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from energon import SamplingParams

ROOT = Path(__file__).resolve().parents[2]

# tests/models/conftest.py makes the checkpoints; it is loaded under its own name (another
# directory's conftest would clash as `conftest`).
_spec = importlib.util.spec_from_file_location(
    "launch_models_conftest", ROOT / "tests" / "models" / "conftest.py"
)
models_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models_conftest)
make_llama = models_conftest.make_llama

PROMPTS = [[5, 9, 3, 7, 11, 2], [42], [3, 12, 13, 14, 15, 16, 17, 100, 127, 8, 9], [64, 8, 8]]
NEW_TOKENS = [10, 14, 6, 12]
TP, PP = 2, 2


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def generate_all(engine) -> list[list[int]]:
    """Every prompt at once (batched, several steps in flight), greedy; generated ids each."""
    done = await asyncio.gather(
        *(engine.infer(p, greedy(n)) for p, n in zip(PROMPTS, NEW_TOKENS, strict=True))
    )
    return [c.token_ids for c in done]


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of an `energon worker` process: one torch thread (2-core machines run
    several workers at once), the launcher's variables from extra."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def worker_command(controller: str, rank: int | None = None) -> list[str]:
    """`energon worker --controller ...` (rank from the environment when rank is None)."""
    cmd = [sys.executable, "-m", "energon.cli", "worker", "--controller", controller]
    return cmd if rank is None else [*cmd, "--rank", str(rank)]


def stop(procs: list[subprocess.Popen], timeout: float = 10.0) -> list[int | None]:
    """Waits up to timeout for each process, kills those left (test cleanup); exit codes."""
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            codes.append(None)
    return codes
