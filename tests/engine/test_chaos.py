"""Chaos: requests on the `tiny` preset (tp=2, pp=2, CPU) while random workers are SIGKILLed at
random times.

Every request either completes with its solo result (the same prompt run alone, greedy, before
the chaos; compared up to its first near-tie) or fails with a typed error (`energon.errors`);
none is lost (a wrong result or an untyped error) and none hangs; no worker process, ipc socket
folder, shared-memory segment or file descriptor is left behind; afterwards the Engine serves
every prompt correctly again.

The short run is part of CI. The long run (2,000 requests over 2 minutes) runs with
ENERGON_LONG=1; ENERGON_CHAOS_SEED picks the random schedule and ENERGON_CHAOS_REPORT=PATH
writes the figures as JSON (docs/reliability.md quotes them).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import multiprocessing
import os
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass, field

import pytest
from engine_helpers import MIN_MARGIN, one_torch_thread  # noqa: F401 (one_torch_thread: autouse)

from energon import Engine, SamplingParams
from energon.errors import EnergonError

LONG = os.environ.get("ENERGON_LONG") == "1"
SEED = int(os.environ.get("ENERGON_CHAOS_SEED", "8"))
REQUESTS, SECONDS, KILLS = (2000, 120.0, 8) if LONG else (200, 15.0, 2)
MAX_TOKENS = 8
HANG_S = 300.0  # a request that has not ended after this long has hung
PROMPTS = [f"chaos {i}: " + "abcdefghij"[: i % 10] * (1 + i % 4) for i in range(24 if LONG else 12)]
TP, PP = 2, 2

pytestmark = pytest.mark.timeout(1500 if LONG else 400)


@dataclass
class Figures:
    """What docs/reliability.md reports of a run."""

    seed: int
    requests: int
    seconds: float
    faults_injected: int = 0
    faults_while_serving: int = 0  # the others hit a group being replaced or started
    completed: int = 0
    failed_typed: int = 0
    failed_by_type: dict = field(default_factory=dict)
    lost: int = 0  # a wrong result or an untyped error
    hung: int = 0
    restarts: int = 0
    restart_failures: int = 0
    retried_requests: int = 0
    run_seconds: float = 0.0
    leaks: dict = field(default_factory=dict)
    lost_examples: list = field(default_factory=list)


@dataclass
class Solo:
    """A prompt's greedy result alone, and per token the gap between its two best logprobs."""

    tokens: list[int]
    margins: list[float]

    def matches(self, got: list[int], n: int) -> bool:
        """`got` is the first n solo tokens, all of them or up to the first near-tie."""
        clear = next((i for i, m in enumerate(self.margins[:n]) if m <= MIN_MARGIN), n)
        return len(got) == n and got[:clear] == self.tokens[:clear]


# ------------------------------------------------------------------------------ what leaks


def workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("energon-worker")]


def child_pids() -> set[int]:
    """Processes whose parent is this one (zombies included), from /proc."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and b"resource_tracker" not in cmdline:
            found.add(int(entry))
    return found


def shm_segments() -> set[str]:
    """The energon memfds this process maps or holds open (their names carry our pid)."""
    prefix = f"/memfd:energon-{os.getpid()}-"
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(prefix):
                found.add(fields[5].split(" (deleted)")[0].strip())
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            found.add(target.split(" (deleted)")[0])
    return found


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------------------ the run


async def solo_results(engine: Engine) -> dict[str, Solo]:
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
    out = {}
    for prompt in PROMPTS:
        done = await engine.infer(prompt, params)
        margins = [lp.top[0][1] - lp.top[1][1] for lp in done.logprobs]
        out[prompt] = Solo(done.token_ids, margins)
    return out


async def one_request(engine: Engine, prompt: str, n: int, streamed: bool) -> list[int]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    if not streamed:
        done = await engine.infer(prompt, params)
        assert done.finish_reason == "length"
        return done.token_ids
    ids, reason = [], None
    async for piece in engine.stream(prompt, params):
        ids += piece.token_ids
        reason = piece.finish_reason
    assert reason == "length"
    return ids


async def chaos(engine: Engine, solo: dict[str, Solo], figures: Figures) -> None:
    """REQUESTS requests arriving evenly over SECONDS, KILLS SIGKILLs of a random live worker at
    random times; fills in figures."""
    rng = random.Random(SEED)
    t0 = time.monotonic()
    failed = collections.Counter()

    async def request(i: int) -> None:
        prompt, n = rng.choice(PROMPTS), rng.randint(1, MAX_TOKENS)
        streamed = rng.random() < 0.5
        await asyncio.sleep(max(0.0, t0 + i * SECONDS / REQUESTS - time.monotonic()))
        try:
            got = await asyncio.wait_for(one_request(engine, prompt, n, streamed), HANG_S)
        except asyncio.TimeoutError:
            figures.hung += 1
        except EnergonError as exc:
            failed[type(exc).__name__] += 1
        except Exception as exc:  # an untyped error (or a wrong finish reason): lost
            figures.lost += 1
            figures.lost_examples.append(f"{prompt!r}: {exc!r}")
        else:
            if solo[prompt].matches(got, n):
                figures.completed += 1
            else:
                figures.lost += 1
                figures.lost_examples.append(f"{prompt!r} x{n}: {got} != {solo[prompt].tokens}")

    async def killer() -> None:
        for at in sorted(rng.uniform(0.05, 0.95) * SECONDS for _ in range(KILLS)):
            await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
            alive = [p for p in workers() if p.is_alive()]
            if alive:  # none between a failed group's end and the next one's spawn
                figures.faults_while_serving += engine.health == "ok"
                os.kill(rng.choice(alive).pid, signal.SIGKILL)
                figures.faults_injected += 1

    await asyncio.gather(killer(), *(request(i) for i in range(REQUESTS)))
    await asyncio.wait_for(engine.recovery.wait(), HANG_S)  # a restart the last kill began
    figures.run_seconds = round(time.monotonic() - t0, 1)
    figures.failed_by_type = dict(failed)
    figures.failed_typed = sum(failed.values())
    stats = engine.stats()
    figures.restarts = stats["restarts"]
    figures.restart_failures = stats["restart_failures"]
    figures.retried_requests = stats["retried_requests"]


def report(figures: Figures) -> None:
    text = json.dumps(asdict(figures), indent=1)
    print(f"chaos figures: {text}")
    path = os.environ.get("ENERGON_CHAOS_REPORT")
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


async def test_random_sigkills_lose_no_request_hang_none_and_leak_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # our groups' ipc socket folders
    children_before = child_pids()
    figures = Figures(SEED, REQUESTS, SECONDS)
    engine = Engine(
        "tiny",
        tp=TP,
        pp=PP,
        device="cpu",
        progress=False,
        retry_on_failure=True,
        max_restarts=10,
        restart_backoff=0.1,
    )
    await engine.start()
    try:
        solo = await solo_results(engine)
        gc.collect()
        fds_serving = open_fds()
        await chaos(engine, solo, figures)
        assert engine.health == "ok", engine.health_report()

        # While it serves: exactly one group's processes, socket folder and segments.
        live = workers()
        leaks = figures.leaks
        leaks["processes_while_serving"] = len(child_pids() - children_before) - TP * PP
        leaks["socket_dirs_while_serving"] = len(list(tmp_path.glob("energon-*"))) - 1
        gc.collect()
        leaks["shm_segments_while_serving"] = max(0, len(shm_segments()) - 2 * TP * PP)
        leaks["fds_while_serving"] = max(0, open_fds() - fds_serving)  # pipes, sockets, memfds
        assert len(live) == TP * PP and all(p.is_alive() for p in live)

        # Afterwards it serves every prompt as it did alone.
        again = await solo_results(engine)
        wrong = [p for p in PROMPTS if not solo[p].matches(again[p].tokens, MAX_TOKENS)]
        assert wrong == []
    finally:
        await engine.shutdown()
    gc.collect()
    leaks["processes"] = len(child_pids() - children_before) + len(workers())
    leaks["socket_dirs"] = len(list(tmp_path.glob("energon-*")))
    leaks["shm_segments"] = len(shm_segments())
    report(figures)

    assert figures.faults_injected == KILLS
    assert figures.restarts >= 1
    assert figures.completed + figures.failed_typed == REQUESTS, figures.lost_examples[:5]
    assert (figures.lost, figures.hung) == (0, 0)
    assert set(leaks.values()) == {0}, leaks
