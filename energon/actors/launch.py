"""Starting workers: local processes (spawn context) and `energon worker` for workers started elsewhere.

`energon worker --controller tcp://HOST:PORT` takes its rank from --rank or, when a cluster
launcher started it (torchrun, srun, mpirun, a Kubernetes Indexed Job), from that launcher's
environment.

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
# Set in a worker started by `energon worker` (or Ray) to the controller address it dials, so that
# what must reach the controller's host again (the rendezvous store) uses the same host name.
CONTROLLER_ENV = "ENERGON_CONTROLLER"
# The exit status of a spawned worker whose re-import of the parent's main script tried to start
# workers of its own: the script starts an Engine at import time (no __main__ guard).
UNGUARDED_MAIN_EXIT = 78
UNGUARDED_MAIN_HINT = (
    "the worker process imports your main script, and the script starts an Engine (or actor "
    'group) when imported: put that under `if __name__ == "__main__":`'
)


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

    The child inherits os.environ, updated with env before the worker's own modules are
    imported. Spawning re-imports the parent's __main__ module first, so a variable that a
    library reads as it is imported (torch reads OMP_NUM_THREADS) can arrive too late: the
    Engine's workers set their threads themselves (energon.runner.worker_threads).
    """
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # We are a spawned worker re-importing the parent's script, which would now start
        # workers of its own (multiprocessing refuses with a generic RuntimeError): exit with a
        # status the parent turns into the fix.
        sys.stderr.write(f"energon: {UNGUARDED_MAIN_HINT}\n")
        sys.stderr.flush()
        os._exit(UNGUARDED_MAIN_EXIT)
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

# Where cluster launchers put a process's rank and the number of processes they started, in the
# order looked at: torchrun (and the Kubeflow PyTorchJob operator), Slurm's srun, Open MPI's
# mpirun, a Kubernetes Indexed Job (one pod per rank).
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "JOB_COMPLETION_INDEX")
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _from_env(names: tuple[str, ...], environ) -> tuple[int, str] | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            try:
                return int(value), name
            except ValueError:
                raise ValueError(f"{name} must be an integer (got {value!r})") from None
    return None


def launcher_rank(environ=os.environ) -> tuple[int, str] | None:
    """(rank, the variable it came from) as a cluster launcher set it, or None.
    Raises ValueError if that variable is not an integer."""
    return _from_env(RANK_VARIABLES, environ)


def launcher_world_size(environ=os.environ) -> tuple[int, str] | None:
    """(number of processes, the variable it came from) as a cluster launcher set it, or None.
    Raises ValueError if that variable is not an integer."""
    return _from_env(WORLD_SIZE_VARIABLES, environ)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--controller", required=True, help="tcp://HOST:PORT of the controller")
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help="this worker's rank (default: from the launcher's environment: "
        + ", ".join(RANK_VARIABLES)
        + ")",
    )
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

    rank = args.rank
    if rank is None:
        try:
            found = launcher_rank()
        except ValueError as exc:
            print(f"energon worker: {exc}", file=sys.stderr)
            return 2
        if found is None:
            names = ", ".join(RANK_VARIABLES)
            print(
                f"energon worker: give --rank, or start it with a launcher that sets one of "
                f"{names} (torchrun, srun, mpirun, a Kubernetes Indexed Job)",
                file=sys.stderr,
            )
            return 2
        rank = found[0]
    if rank < 0:
        print(f"--rank must be >= 0 (got {rank})", file=sys.stderr)
        return 2
    os.environ[CONTROLLER_ENV] = args.controller
    return run_worker(
        args.controller,
        rank,
        connect_timeout=args.connect_timeout,
        max_message_bytes=args.max_message_bytes,
        loop=args.loop,
    )
