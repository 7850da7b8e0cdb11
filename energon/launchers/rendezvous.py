"""How workers on several hosts meet in torch.distributed: a TCP store that the controller hosts.

The controller starts the store (a server thread in its own process, listening on a free port) and
hands its address to every worker with the runner's arguments. Every worker connects to it as a
client, so no worker has to be the one that listens and no port has to be agreed between hosts in
advance; NCCL (GPU) and gloo (CPU) exchange their connection details through it.

gloo finds its own address from the host name, which on a multi-homed host (or in a network
namespace) may name an interface the peers cannot reach. Unless GLOO_SOCKET_IFNAME is set, a
worker uses the interface through which it reaches the controller. NCCL picks its interfaces
itself; NCCL_SOCKET_IFNAME overrides it (docs/multinode.md).
"""

from __future__ import annotations

import datetime
import os

from energon.launchers.address import interface_of, source_ip_towards, split_tcp


class StoreServer:
    """The controller's rendezvous store, listening on every interface on a free port; workers
    are told `address` (tcp://HOST:PORT with HOST the controller's advertised address)."""

    def __init__(self, advertised_host: str, timeout_s: float = 300.0):
        import torch.distributed as dist

        self._store = dist.TCPStore(
            advertised_host,
            0,
            None,
            True,
            timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
        self.address = f"tcp://{advertised_host}:{self._store.port}"

    def close(self) -> None:
        """Stops the store's server (once the workers no longer need it)."""
        self._store = None


def reaching_interface(host: str) -> str | None:
    """The name of the local interface whose address this host uses to reach `host`, or None."""
    ip = source_ip_towards(host)
    return None if ip is None else interface_of(ip)


def join_process_group(
    store: str, rank: int, world_size: int, device, timeout_s: float = 300.0
) -> None:
    """Joins the default process group (nccl on a cuda device, gloo otherwise) as rank through
    the controller's store at `store` (tcp://HOST:PORT). Blocks until every rank has joined;
    raises what torch.distributed raises when the store cannot be reached within timeout_s."""
    import torch
    import torch.distributed as dist

    host, port = split_tcp("store", store)
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        interface = reaching_interface(host)
        if interface is not None:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    timeout = datetime.timedelta(seconds=timeout_s)
    client = dist.TCPStore(host, port, world_size, False, timeout=timeout)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=client,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if cuda else None,
    )
