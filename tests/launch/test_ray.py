"""launcher="ray": on a local Ray cluster that the test starts and stops, one placement-group
bundle per pipeline stage holds that stage's tensor-parallel workers, one Ray actor each, and
nothing is left in the cluster after shutdown."""

from __future__ import annotations

import pytest
from launch_helpers import PP, TP, generate_all

from energon import Engine

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ray_cluster():
    """A fresh single-node Ray cluster of 4 logical CPUs owned by this test (never one that
    happens to be running on the machine)."""
    ray = pytest.importorskip("ray", reason="launcher='ray' needs Ray: pip install -e '.[ray]'")
    ray.init(address="local", num_cpus=TP * PP, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def energon_actors(ray) -> dict[int, object]:
    """rank -> handle of each live Ray actor named energon-<id>-rank<R>."""
    return {
        int(a["name"].rsplit("-rank", 1)[1]): ray.get_actor(a["name"], namespace=a["namespace"])
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("energon-")
    }


async def test_ray_places_a_bundle_per_stage_and_generates_what_one_host_generates(
    llama, one_host, ray_cluster
):
    ray = ray_cluster
    engine = Engine(
        str(llama[0]),
        tp=TP,
        pp=PP,
        device="cpu",
        launcher="ray",
        address="tcp://127.0.0.1:0",
        start_timeout=60,
        worker_env={"OMP_NUM_THREADS": "1"},
        progress=False,
    )
    async with engine:
        tokens = await generate_all(engine)
        (group,) = ray.util.placement_group_table().values()
        assert group["strategy"] == "PACK" and group["state"] == "CREATED"
        assert group["bundles"] == {s: {"CPU": float(TP)} for s in range(PP)}
        actors = energon_actors(ray)
        assert sorted(actors) == list(range(TP * PP))
        for rank, actor in actors.items():  # each worker runs on the node of its stage's bundle
            node = await actor.node.remote()
            assert node["node_id"] == group["bundles_to_node_id"][rank // TP]
    assert tokens == one_host
    assert energon_actors(ray) == {}
    (group,) = ray.util.placement_group_table().values()
    assert group["state"] == "REMOVED"
