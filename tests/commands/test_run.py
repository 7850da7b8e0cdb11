"""`energon run`, the README's main job, as a user runs it: a subprocess on the tiny preset."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from energon import Engine, SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def energon_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "energon.cli", "run", *args],
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )


async def test_the_main_job_streams_what_one_worker_generates():
    done = energon_run("--model", "tiny", "--tp", "2", "--pp", "2", "--max-tokens", "8", "Hello, Energon")  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()
    text, end = re.fullmatch(rb"(.*)\n\[(stop|length)\]\n", done.stdout, re.S).groups()
    async with Engine("tiny", device="cpu") as engine:
        ref = await engine.infer("Hello, Energon", SamplingParams(max_tokens=8, temperature=0))
    assert (text.decode(), end.decode()) == (ref.text, ref.finish_reason)
    assert b"ready in" in done.stderr


def test_an_empty_prompt_is_refused_before_any_worker_starts():
    done = energon_run("--model", "tiny", "fine", "")
    assert done.returncode == 2
    assert done.stderr.decode().strip() == "energon: prompt must not be empty"
