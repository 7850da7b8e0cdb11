"""launcher="ray": one worker per device, placed by Ray (an optional extra: `energon[ray]`).

One placement group holds one bundle per pipeline stage, each of tp devices (GPUs, or CPUs on a
cpu run). Ray never splits a bundle across nodes, so a tensor-parallel group always shares a node
(its all-reduces stay on NVLink); the PACK strategy fills as few nodes as can hold the stages, so
the pipeline is cut between nodes only when one node is not enough. Each worker is a Ray actor
that runs `energon worker` for its rank and connects back to the controller over tcp://.

The Engine connects to the cluster Ray already knows (ray.init() done by the caller, RAY_ADDRESS,
or one started on this node with `ray start`), or starts a local one. Ray's own view of a worker
adds to the controller's heartbeats: an actor that dies fails its rank at once, even before it
connected. Shutting the Engine down kills the actors and removes the placement group.
"""

from __future__ import annotations

import asyncio
import uuid

from energon.actors import ActorGroup
from energon.errors import EnergonError
from energon.launchers.cluster import start_cluster_group

RELEASE_TIMEOUT_S = 10.0


class RayWorker:
    """The Ray actor around one energon worker process."""

    def run(self, address: str, rank: int, connect_timeout: float) -> int:
        """Serves as rank of the controller at address until it lets the worker go; returns
        the worker's exit code."""
        import os

        from energon.actors.launch import CONTROLLER_ENV
        from energon.actors.worker import run_worker

        os.environ[CONTROLLER_ENV] = address
        return run_worker(address, rank, connect_timeout=connect_timeout)

    def node(self) -> dict:
        """Where Ray placed this actor: {"node_id", "ip"}."""
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
        }


def _import_ray():
    try:
        import ray
    except ImportError:
        raise EnergonError(
            "launcher='ray' needs Ray: pip install 'energon[ray]' (or pip install ray)"
        ) from None
    return ray


async def start_ray_group(
    tp: int,
    pp: int,
    runner_kwargs: dict,
    address: str | None,
    *,
    env: dict[str, str],
    heartbeat_timeout: float,
    start_timeout: float,
) -> ActorGroup:
    """Places tp * pp workers with Ray and returns their group once every runner is built.

    address: where the controller listens (default tcp://<this node's Ray address>:<free port>).
    Raises EnergonError when Ray cannot place the stages within start_timeout, WorkerFailed when
    a worker dies or does not connect; nothing is left in the cluster then.
    """
    ray = _import_ray()
    if not ray.is_initialized():
        await asyncio.to_thread(ray.init)
    resources = await asyncio.to_thread(ray.cluster_resources)
    device = runner_kwargs.get("device", "auto")
    gpus = device == "cuda" or (device == "auto" and resources.get("GPU", 0) > 0)
    if address is None:
        address = f"tcp://{ray.util.get_node_ip_address()}:0"
    placement = RayPlacement(ray, tp, pp, gpus, env, start_timeout)
    return await start_cluster_group(
        tp,
        pp,
        runner_kwargs,
        address,
        env=env,
        heartbeat_timeout=heartbeat_timeout,
        start_timeout=start_timeout,
        start_workers=placement.start,
        hint="check that every Ray node can reach that address (or pass address='tcp://IP:0' "
        "with one they can)",
    )


class RayPlacement:
    """The placement group and actors of one Engine; released with its group."""

    def __init__(self, ray, tp: int, pp: int, gpus: bool, env: dict, start_timeout: float):
        self.ray, self.tp, self.pp, self.gpus = ray, tp, pp, gpus
        self.env = env
        self.start_timeout = start_timeout
        self.tag = uuid.uuid4().hex[:8]
        self.pg = None
        self.actors: list = []
        self.runs: list = []  # each actor's run() ObjectRef
        self.watchers: list[asyncio.Task] = []

    async def start(self, group: ActorGroup, address: str) -> None:
        """Reserves one bundle per stage, then starts each rank's actor in its stage's bundle.
        Raises EnergonError if Ray cannot place the bundles within start_timeout."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ray = self.ray
        group.on_shutdown(self.release)
        unit = "GPU" if self.gpus else "CPU"
        bundle = {"CPU": self.tp, "GPU": self.tp} if self.gpus else {"CPU": self.tp}
        self.pg = placement_group([dict(bundle) for _ in range(self.pp)], strategy="PACK")
        try:
            await asyncio.wait_for(_wait(self.pg.ready()), self.start_timeout)
        except asyncio.TimeoutError:
            free = await asyncio.to_thread(ray.available_resources)
            raise EnergonError(
                f"Ray could not place {self.pp} stage(s) of {self.tp} {unit}(s) each, every "
                f"stage on one node, within {self.start_timeout:g}s (available now: "
                f"{ {k: v for k, v in free.items() if k in ('CPU', 'GPU')} }); add nodes or "
                "lower tp / pp"
            ) from None
        worker = ray.remote(RayWorker)
        for rank in range(self.tp * self.pp):
            actor = worker.options(
                name=f"energon-{self.tag}-rank{rank}",
                num_cpus=1,
                num_gpus=1 if self.gpus else 0,
                max_concurrency=2,  # node() answers while run() serves
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=rank // self.tp
                ),
                runtime_env={"env_vars": dict(self.env)},
            ).remote()
            self.actors.append(actor)
            run = actor.run.remote(address, rank, self.start_timeout)
            self.runs.append(run)
            self.watchers.append(asyncio.ensure_future(self._watch(group, rank, run)))

    async def _watch(self, group: ActorGroup, rank: int, run) -> None:
        """Fails rank as soon as its actor's worker returns or the actor dies."""
        try:
            code = await _wait(run)
            reason = f"its Ray actor's worker exited with code {code}"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = f"its Ray actor died: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        group.fail_worker(rank, reason)

    async def release(self) -> None:
        """Stops watching, kills the actors (waiting up to RELEASE_TIMEOUT_S for them to be gone)
        and removes the placement group."""
        for task in self.watchers:
            task.cancel()
        actors, runs, pg = self.actors, self.runs, self.pg
        self.actors, self.runs, self.pg = [], [], None

        def kill() -> None:
            ray = self.ray
            for actor in actors:
                ray.kill(actor)
            if runs:  # a killed actor's run() ends (with an error) once Ray knows it is dead
                ray.wait(runs, num_returns=len(runs), timeout=RELEASE_TIMEOUT_S)
            if pg is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(pg)

        await asyncio.to_thread(kill)


def _wait(ref) -> asyncio.Future:
    """A Ray ObjectRef as a future of this event loop."""
    return asyncio.wrap_future(ref.future())
