"""Starting workers: local processes (spawn context) and `energon worker` for workers started elsewhere.

A locally spawned worker dies with its controller: the kernel sends it SIGKILL when the controller
(the thread that started it) dies (PR_SET_PDEATHSIG), so even a SIGKILLed controller leaves no
orphans. Workers started elsewhere rely on the heartbeat: a silent controller makes them exit.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable

from energon.actors import protocol

PR_SET_PDEATHSIG = 1


def start_worker(
    address: str,
    rank: int,
    *,
    env: dict[str, str] | None = None,
    max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
    connect_timeout: float = 120.0,
    loop: str = "auto",
) -> multiprocessing.Process:
    """Starts one worker process that connects to address as rank; returns the started Process.

    The child inherits os.environ, updated with env before any user code is imported.
    """
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(
        target=_worker_entry,
        args=(
            address,
            rank,
            os.getpid(),
            dict(env or {}),
            max_message_bytes,
            connect_timeout,
            loop,
        ),
        name=f"energon-worker-{rank}",
        daemon=False,  # a daemonic process could not start processes of its own
    )
    proc.start()
    return proc


def _worker_entry(address, rank, parent_pid, env, max_message_bytes, connect_timeout, loop):
    die_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches the whole process group: the controller owns a spawned
    # worker's life (it drains requests, then shuts workers down), so the worker ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)
    from energon.actors.worker import run_worker

    sys.exit(
        run_worker(
            address,
            rank,
            connect_timeout=connect_timeout,
            max_message_bytes=max_message_bytes,
            loop=loop,
        )
    )


def die_with_parent(parent_pid: int) -> None:
    """Asks Linux to SIGKILL this process when its parent dies; exits now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def register_exit_hook(hook: Callable[[], None]) -> None:
    atexit.register(hook)


# ------------------------------------------------------------------------ `energon worker` command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", required=True, help="tcp://HOST:PORT of the controller")
    parser.add_argument("--rank", type=int, required=True, help="this worker's rank")
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the controller before giving up (default 300)",
    )
    parser.add_argument("--max-message-bytes", type=int, default=protocol.DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")


def main(args: argparse.Namespace) -> int:
    """Runs one worker until the controller shuts it down; returns its exit code."""
    from energon.actors.worker import run_worker

    if args.rank < 0:
        print(f"--rank must be >= 0 (got {args.rank})", file=sys.stderr)
        return 2
    return run_worker(
        args.controller,
        args.rank,
        connect_timeout=args.connect_timeout,
        max_message_bytes=args.max_message_bytes,
        loop=args.loop,
    )
