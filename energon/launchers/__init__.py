"""Where the Engine's workers come from, beyond the local spawn: other hosts, placed by existing
cluster engines (Energon does not invent one). See docs/multinode.md.

    launcher="local"     every worker a child process of this one (energon/actors/launch.py)
    launcher="external"  the controller listens on `address` and waits for tp * pp workers that
                         torchrun, srun or Kubernetes started with
                         `energon worker --controller tcp://HOST:PORT` (cluster.py)
    launcher="ray"       one worker per device in a Ray placement group (ray_launcher.py)

Workers of the last two join the controller over tcp:// and meet in NCCL / gloo through a TCP
store that the controller hosts (rendezvous.py), each hosting a ClusterRunner (cluster_runner.py).
"""

from __future__ import annotations

import importlib.util

from energon.actors import ActorGroup
from energon.errors import InvalidRequest
from energon.launchers.address import split_tcp

LAUNCHERS = ("local", "external", "ray")


def check_launcher(launcher: str, address: str | None) -> None:
    """Raises InvalidRequest("launcher" or "address") unless the pair can work: an external
    launcher needs the tcp://HOST:PORT its workers were told (a fixed port), Ray needs Ray."""
    if launcher not in LAUNCHERS:
        raise InvalidRequest(
            "launcher",
            f"must be {', '.join(map(repr, LAUNCHERS[:-1]))} or 'ray' (got {launcher!r})",
        )
    if launcher == "external":
        if address is None:
            raise InvalidRequest(
                "address",
                "is needed with launcher='external': the tcp://HOST:PORT that the workers are "
                "started with (`energon worker --controller tcp://HOST:PORT`)",
            )
        split_tcp("address", address, any_port=False)
    elif launcher == "ray":
        if address is not None:
            split_tcp("address", address)
        if importlib.util.find_spec("ray") is None:
            raise InvalidRequest("launcher", "'ray' needs Ray: pip install 'energon[ray]'")
    elif address is not None and not address.startswith(("tcp://", "ipc://")):
        raise InvalidRequest(
            "address", f"must be 'tcp://HOST:PORT' or 'ipc://PATH' (got {address!r})"
        )


async def start_remote_workers(
    launcher: str,
    tp: int,
    pp: int,
    runner_kwargs: dict,
    *,
    address: str | None,
    env: dict[str, str],
    heartbeat_timeout: float,
    start_timeout: float,
) -> ActorGroup:
    """The group of tp * pp workers that `launcher` ("external" or "ray") brings, each hosting
    a ClusterRunner built from runner_kwargs (ModelRunner's, less init_method). Raises what
    start_cluster_group / start_ray_group raise."""
    options = dict(env=env, heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout)
    if launcher == "ray":
        from energon.launchers.ray_launcher import start_ray_group

        return await start_ray_group(tp, pp, runner_kwargs, address, **options)
    from energon.launchers.cluster import start_cluster_group

    return await start_cluster_group(
        tp,
        pp,
        runner_kwargs,
        address,
        hint="start each missing rank with `energon worker --controller "
        f"{address}` (its rank from --rank, RANK or SLURM_PROCID)",
        **options,
    )
