"""Baselines for `energon bench actors`, each measured the same way as Energon.

- bare: a synchronous pyzmq DEALER/ROUTER + msgpack echo, the floor for a ZeroMQ runtime in Python
- torch.distributed.rpc (TensorPipe), what EnergonAI used
- Ray actors

Each returns {metric: value} with latencies in seconds and rates in calls/s, or raises
BaselineUnavailable saying why it could not run.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import tempfile
import time

import msgpack

MIB = 1 << 20


class BaselineUnavailable(Exception):
    """The baseline could not be run here; the message says why."""


def percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summarise(name: str, samples: list[float]) -> dict[str, float]:
    return {f"{name} median": statistics.median(samples), f"{name} p99": percentile(samples, 0.99)}


# ------------------------------------------------------------------------------------ bare echo


def _bare_server(address: str) -> None:
    import zmq

    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(address)
    while True:
        frames = sock.recv_multipart(copy=False)
        head = msgpack.unpackb(frames[1].buffer)
        if head["kind"] == "stop":
            return
        reply = {"v": 1, "id": head["id"], "kind": "reply", "method": None, "meta": head["meta"]}
        sock.send_multipart([frames[0], msgpack.packb(reply), *frames[2:]], copy=False)


def run_bare(sizes: dict[str, int], n: int, n_large: int, window: int, rounds: int) -> dict:
    """The floor: one synchronous round trip at a time, payloads as raw frames both ways."""
    import torch
    import zmq

    address = f"ipc://{tempfile.mkdtemp(prefix='energon-bench-')}/bare"
    server = multiprocessing.get_context("spawn").Process(target=_bare_server, args=(address,))
    server.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    ids = iter(range(1, 1 << 62))

    def call(payload=None):
        meta = {"args": [], "kwargs": {}}
        frames = [
            msgpack.packb({"v": 1, "id": next(ids), "kind": "call", "method": "echo", "meta": meta})
        ]
        if payload is not None:
            frames.append(payload.view(-1).view(torch.uint8).numpy())
        sock.send_multipart(frames, copy=False)
        reply = sock.recv_multipart(copy=False)
        msgpack.unpackb(reply[0].buffer)
        if payload is not None:
            torch.frombuffer(reply[1], dtype=payload.dtype)

    try:
        out: dict[str, float] = {}
        timed(call, 500)
        out.update(summarise("empty", timed(call, n)))
        for name, size in sizes.items():
            t = torch.randn(size // 4)
            reps = n_large if size >= 16 * MIB else n // 4
            timed(lambda t=t: call(t), 3)
            out.update(summarise(name, timed(lambda t=t: call(t), reps)))
        head = msgpack.packb(
            {"v": 1, "id": 0, "kind": "call", "method": "ping", "meta": {"args": [], "kwargs": {}}}
        )
        t0 = time.perf_counter()
        for _ in range(rounds):
            for _ in range(window):
                sock.send(head)
            for _ in range(window):
                msgpack.unpackb(sock.recv())
        out["calls/s"] = rounds * window / (time.perf_counter() - t0)
        return out
    finally:
        sock.send_multipart([msgpack.packb({"kind": "stop", "id": 0})])
        server.join(10)
        if server.is_alive():
            server.kill()
        sock.close(0)


# ---------------------------------------------------------------------------- torch.distributed.rpc


def rpc_noop():
    return None


def rpc_echo(x):
    return x


def _rpc_worker(port: int) -> None:
    from torch.distributed import rpc

    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=120)
    rpc.init_rpc("worker", rank=1, world_size=2, rpc_backend_options=opts)
    rpc.shutdown()


def run_torch_rpc(sizes: dict[str, int], n: int, n_large: int, window: int, rounds: int) -> dict:
    import torch
    from torch.distributed import rpc

    if not rpc.is_available():
        raise BaselineUnavailable("torch.distributed.rpc is not available in this torch build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = multiprocessing.get_context("spawn").Process(target=_rpc_worker, args=(port,))
    worker.start()
    opts = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=120)
    rpc.init_rpc("controller", rank=0, world_size=2, rpc_backend_options=opts)
    try:
        out: dict[str, float] = {}
        timed(lambda: rpc.rpc_sync("worker", rpc_noop), 300)
        out.update(summarise("empty", timed(lambda: rpc.rpc_sync("worker", rpc_noop), n)))
        for name, size in sizes.items():
            t = torch.randn(size // 4)
            reps = n_large if size >= 16 * MIB else n // 4
            call = lambda t=t: rpc.rpc_sync("worker", rpc_echo, args=(t,))  # noqa: E731
            timed(call, 3)
            out.update(summarise(name, timed(call, reps)))
        t0 = time.perf_counter()
        for _ in range(rounds):
            torch.futures.wait_all([rpc.rpc_async("worker", rpc_noop) for _ in range(window)])
        out["calls/s"] = rounds * window / (time.perf_counter() - t0)
        return out
    finally:
        rpc.shutdown()
        worker.join(30)
        if worker.is_alive():
            worker.kill()


# ----------------------------------------------------------------------------------------- Ray


def run_ray(sizes: dict[str, int], n: int, n_large: int, window: int, rounds: int) -> dict:
    try:
        import ray
    except ImportError as exc:
        raise BaselineUnavailable(f"ray is not installed ({exc}); pip install ray") from None
    import torch

    @ray.remote
    class EchoActor:
        def ping(self):
            return None

        def echo(self, x):
            return x

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        actor = EchoActor.remote()
        ray.get(actor.ping.remote())
        out: dict[str, float] = {}
        timed(lambda: ray.get(actor.ping.remote()), 200)
        out.update(summarise("empty", timed(lambda: ray.get(actor.ping.remote()), n)))
        for name, size in sizes.items():
            t = torch.randn(size // 4)
            reps = n_large if size >= 16 * MIB else n // 4
            call = lambda t=t: ray.get(actor.echo.remote(t))  # noqa: E731
            timed(call, 3)
            out.update(summarise(name, timed(call, reps)))
        t0 = time.perf_counter()
        for _ in range(rounds):
            ray.get([actor.ping.remote() for _ in range(window)])
        out["calls/s"] = rounds * window / (time.perf_counter() - t0)
        return out
    finally:
        ray.shutdown()
