"""Two hosts (two network namespaces, netns_hosts.py) serve one tp=2, pp=2 model over tcp:// and
gloo: host a runs the controller (launcher="external", netns_controller.py) and stage 0 (ranks 0
and 1), host b runs stage 1 (ranks 2 and 3), so each tensor-parallel group stays on its host and
the pipeline crosses the link. The controller is told to bind to host a's interface (by its
name); the workers are given its address and each finds the interface that reaches it.

The tests share one cluster (a start costs seconds of CPU per worker); the last one kills a
worker, so it stays last.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from launch_helpers import ROOT, stop, worker_command, worker_env
from netns_hosts import Host, two_hosts

pytestmark = pytest.mark.timeout(90)

HERE = Path(__file__).resolve().parent
PORT = 29500  # a fresh namespace has nothing bound


@dataclass
class Cluster:
    a: Host
    b: Host
    controller: subprocess.Popen
    workers: list[subprocess.Popen]  # by rank

    def send(self, command: str) -> None:
        self.controller.stdin.write(command + "\n")
        self.controller.stdin.flush()

    def receive(self) -> dict:
        line = self.controller.stdout.readline()
        code = None if line else self.controller.wait()
        assert line, f"the controller exited with code {code} before answering"
        return json.loads(line)


@pytest.fixture(scope="module")
def cluster(llama):
    """The controller and ranks 0-1 in host a, ranks 2-3 in host b (each rank from RANK, as
    torchrun or srun would set it), started and ready."""
    with two_hosts() as (a, b):
        address = f"tcp://{a.ip}:{PORT}"
        bind = f"tcp://{a.interface}:{PORT}"
        controller = a.popen(
            [sys.executable, str(HERE / "netns_controller.py"), str(llama[0]), bind],
            env=worker_env(PYTHONPATH=str(HERE)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        workers = [
            host.popen(worker_command(address), env=worker_env(RANK=str(rank), WORLD_SIZE="4"))
            for rank, host in enumerate((a, a, b, b))
        ]
        c = Cluster(a, b, controller, workers)
        try:
            assert c.receive() == {"event": "ready"}
            yield c
        finally:
            stop([controller, *workers], timeout=0)


def test_two_hosts_generate_what_one_host_generates(cluster, one_host):
    cluster.send("generate")
    assert cluster.receive()["tokens"] == one_host


def test_worker_killed_on_one_host_fails_requests_then_both_hosts_shut_down(cluster):
    cluster.send("streams")
    assert cluster.receive() == {"event": "streaming"}
    cluster.workers[3].kill()  # rank 3, on host b
    killed_at = time.monotonic()
    failed = cluster.receive()
    assert failed["event"] == "failed"
    # both requests in flight fail naming the dead worker, at once: the end of its connection is
    # seen well inside the heartbeat bound (10 s), and the Engine says it is unhealthy
    assert [e.split(":")[0] for e in failed["errors"]] == ["WorkerFailed rank=3"] * 2
    assert failed["at"] - killed_at < 2.0
    assert failed["health"] == "failed"
    assert cluster.receive() == {"event": "shut down"}
    assert cluster.controller.wait(30) == 0
    # the survivors on both hosts were let go by the controller; nothing is left on either host
    assert stop(cluster.workers) == [0, 0, 0, -9]
    assert cluster.a.pids() == [] and cluster.b.pids() == []
