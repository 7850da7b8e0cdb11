"""The actor of a worker that a cluster engine started (Ray, torchrun, srun, Kubernetes): a
StagedRunner that joins the process group through the controller's store (rendezvous.py).

Worker side only: the controller names it by import path and never imports it.
"""

from __future__ import annotations

import os
import socket

from energon.actors import actor_context
from energon.actors.launch import CONTROLLER_ENV, launcher_world_size
from energon.launchers.address import source_ip_towards, split_tcp
from energon.launchers.rendezvous import join_process_group
from energon.launchers.sentinel import hold
from energon.staged_runner import StagedRunner

# Where launchers put a process's index among those of its host, in the order looked at.
LOCAL_RANK_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


def toward_controller(address: str, environ=os.environ) -> str:
    """address (tcp://HOST:PORT, a port of the controller's host) with HOST replaced by the host
    this worker dialed to reach the controller, when it knows (CONTROLLER_ENV): the name or
    address that works from here, whatever the controller guessed it would be."""
    dialed = environ.get(CONTROLLER_ENV)
    if not dialed or not dialed.startswith("tcp://"):
        return address
    host, _ = split_tcp("controller", dialed)
    return f"tcp://{host}:{split_tcp('address', address)[1]}"


def local_device(device: str, rank: int, environ=os.environ) -> str:
    """The device string for this worker: "cuda" (or "auto" with CUDA present) becomes
    "cuda:N" with N its launcher-given local rank (else its rank) modulo the visible GPUs;
    anything else is returned as it is."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    count = torch.cuda.device_count()
    if device != "cuda" or count == 0:  # no GPU: building the runner says so
        return device
    local = next((environ[n] for n in LOCAL_RANK_VARIABLES if environ.get(n, "").isdigit()), rank)
    return f"cuda:{int(local) % count}"


class ClusterRunner(StagedRunner):
    """`ClusterRunner(store=tcp://HOST:PORT, sentinel=[tcp://HOST:PORT, token], env={...},
    **ModelRunner kwargs)`, then `load()`.

    env (the Engine's worker_env and settings) is applied to this process before anything
    reads it; variables a process reads as it starts (CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS)
    must come from the launcher. Raises ValueError when the launcher started a different
    number of workers than the controller serves.
    """

    def __init__(
        self,
        *,
        store: str,
        sentinel: list[str] | None = None,
        env: dict[str, str] | None = None,
        **kwargs,
    ):
        ctx = actor_context()
        started = launcher_world_size()
        if started is not None and started[0] != ctx.world_size:
            count, name = started
            raise ValueError(
                f"the launcher started {count} workers ({name}={count}) but the controller "
                f"serves tp * pp = {ctx.world_size}: start exactly {ctx.world_size}"
            )
        os.environ.update(env or {})
        store = toward_controller(store)
        # open for the life of this process: the controller learns of its end at once
        self._sentinel = None
        if sentinel is not None:
            self._sentinel = hold(toward_controller(sentinel[0]), sentinel[1], ctx.rank)
        self._rank = ctx.rank
        self._world_size = ctx.world_size
        self._store = store
        kwargs["device"] = local_device(kwargs.get("device", "auto"), ctx.rank)
        super().__init__(init_method=store, rank=ctx.rank, **kwargs)

    def place(self) -> dict:
        """Where this worker runs: {"rank", "host" (host name), "ip" (its address towards the
        controller), "pid", "device"}."""
        host, _ = split_tcp("store", self._store)
        return {
            "rank": self._rank,
            "host": socket.gethostname(),
            "ip": source_ip_towards(host),
            "pid": os.getpid(),
            "device": self._kwargs["device"],
        }

    def load(self) -> dict:
        """Joins the process group through the controller's store, then builds and loads this
        rank's stage (StagedRunner.load); returns and raises what that returns and raises."""
        import torch

        device = torch.device(self._kwargs["device"])
        join_process_group(self._store, self._rank, self._world_size, device)
        return super().load()
