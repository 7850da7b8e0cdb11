"""Workers that a cluster engine starts join the controller over tcp:// (launcher "external", and
under "ray").

The controller binds its ZeroMQ socket to the chosen address, starts the rendezvous store beside
it, lets the launcher start its workers (Ray does; for "external" someone else already has or
will: torchrun, srun, Kubernetes), waits up to start_timeout for every rank, and builds a
ClusterRunner on each; each worker also holds a sentinel connection (sentinel.py), so that its
death is known at once. Ranks are laid out as everywhere in Energon, rank = stage * tp + tp_rank,
so a launcher that starts consecutive ranks on one host keeps each tensor-parallel group inside
a host and cuts the pipeline between hosts; a group that spans hosts is warned about.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import zmq

from energon.actors import ActorGroup
from energon.errors import EnergonError, WorkerFailed
from energon.launchers.address import resolve, split_tcp
from energon.launchers.rendezvous import StoreServer
from energon.launchers.sentinel import SentinelServer

log = logging.getLogger("energon")

CLUSTER_RUNNER = "energon.launchers.cluster_runner:ClusterRunner"

# start_workers(group, address the workers must connect to): starts them (or nothing)
StartWorkers = Callable[[ActorGroup, str], Awaitable[None]]


async def start_cluster_group(
    tp: int,
    pp: int,
    runner_kwargs: dict,
    address: str,
    *,
    env: dict[str, str],
    heartbeat_timeout: float,
    start_timeout: float,
    start_workers: StartWorkers | None = None,
    hint: str = "",
) -> ActorGroup:
    """Listens on address (tcp://HOST:PORT), starts the workers with start_workers if given and
    returns the group once all tp * pp have connected and built their runner.

    Raises InvalidRequest("address") for an address that names nothing here, EnergonError if it
    cannot be listened on (taken, not this host's), WorkerFailed naming
    the ranks that did not connect within start_timeout (followed by `hint`), or what a worker
    or start_workers raised; the group is shut down then.
    """
    world_size = tp * pp
    where = await asyncio.to_thread(resolve, "address", address)
    try:
        group = ActorGroup.listen(world_size, where.bind, heartbeat_timeout=heartbeat_timeout)
    except zmq.ZMQError as exc:
        raise EnergonError(
            f"the controller cannot listen on {where.bind} ({exc.strerror}): choose another "
            "port, or an address of this host"
        ) from None
    where = where.with_port(split_tcp("address", group.address)[1])
    try:
        store = StoreServer(where.advertised_host, start_timeout)
        group.on_shutdown(store.close)
        sentinel = SentinelServer(group)
        group.on_shutdown(sentinel.close)
        await sentinel.start(where.bind_host, where.advertised_host)
        if start_workers is not None:
            await start_workers(group, where.advertised)
        log.info(
            "energon: waiting up to %gs for %d worker(s) to join %s",
            start_timeout,
            world_size,
            where.advertised,
        )
        kwargs = dict(
            runner_kwargs,
            store=store.address,
            sentinel=[sentinel.address, sentinel.token],
            env=env,
        )
        await group.join(CLUSTER_RUNNER, kwargs=kwargs, start_timeout=start_timeout)
        await _report_placement(group, tp, pp)
    except WorkerFailed:
        await group.shutdown()
        missing = group.missing_ranks()
        if missing and group.failure is None:  # a start-up timeout, not a worker that died
            raise WorkerFailed(
                missing[0],
                f"ranks {missing} of {world_size} did not connect to {where.advertised} within "
                f"{start_timeout:g}s{'; ' + hint if hint else ''}",
            ) from None
        raise
    except BaseException:
        await group.shutdown()
        raise
    return group


async def _report_placement(group: ActorGroup, tp: int, pp: int) -> None:
    """Logs which host each stage landed on; warns about a tensor-parallel group that spans
    hosts (its all-reduces, every layer, would cross the network)."""
    places = await group.broadcast("place")
    for stage in range(pp):
        ranks = range(stage * tp, (stage + 1) * tp)
        hosts = sorted({f"{places[r]['host']} ({places[r]['ip']})" for r in ranks})
        log.info("energon: stage %d (ranks %d-%d) on %s", stage, ranks[0], ranks[-1], hosts)
        if len(hosts) > 1:
            log.warning(
                "energon: the tensor-parallel ranks %d-%d of stage %d run on %d hosts (%s): "
                "every layer's all-reduce crosses the network; start %d consecutive ranks on "
                "each host",
                ranks[0],
                ranks[-1],
                stage,
                len(hosts),
                ", ".join(hosts),
                tp,
            )
