"""A process sentinel across hosts: each worker holds one TCP connection to the controller open
for as long as its process lives.

A local worker's death is seen at once through its process sentinel; a worker on another host
has none, and heartbeats take heartbeat_timeout to call it silent. But when a process dies,
however it dies (SIGKILL, OOM killer, a crash in NCCL), its kernel closes its sockets, and the
controller reads end-of-file on this connection within a network round trip: that rank fails at
once, naming the worker, while the peers it leaves behind are still reporting broken
collectives. A host that vanishes sends nothing; heartbeats still bound that case.
"""

from __future__ import annotations

import asyncio
import secrets
import socket

from energon.actors import ActorGroup
from energon.launchers.address import split_tcp

HELLO_TIMEOUT_S = 10.0  # a connection that does not name its rank in time is dropped


class SentinelServer:
    """Listens for the workers' sentinel connections of one group; `address` and `token` go to
    the workers. A connection that closes fails its rank (group.fail_worker)."""

    def __init__(self, group: ActorGroup):
        self.group = group
        self.token = secrets.token_hex(16)
        self.address = ""
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, bind_host: str, advertised_host: str) -> None:
        """Listens on bind_host at a free port; sets `address` to tcp://advertised_host:PORT."""
        self._server = await asyncio.start_server(self._serve, bind_host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"tcp://{advertised_host}:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            line = await asyncio.wait_for(reader.readline(), HELLO_TIMEOUT_S)
            token, _, rank = line.strip().partition(b" ")
            if not secrets.compare_digest(token, self.token.encode()) or not rank.isdigit():
                return  # not one of ours
            if int(rank) >= self.group.world_size:
                return
            try:
                while await reader.read(4096):  # the worker never writes again: wait for the end
                    pass
            except ConnectionError:  # reset rather than closed: gone all the same
                pass
            self.group.fail_worker(
                int(rank), "its process exited (its connection to the controller closed)"
            )
        except (asyncio.TimeoutError, ConnectionError, ValueError):  # ValueError: an overlong line
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def close(self) -> None:
        """Stops listening and drops every connection (once the group is shut down)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()


def hold(address: str, token: str, rank: int) -> socket.socket:
    """Worker side: connects to the sentinel at address (tcp://HOST:PORT) and names rank; keep
    the returned socket open for the life of the process. Raises OSError if it cannot connect."""
    host, port = split_tcp("sentinel", address)
    sock = socket.create_connection((host, port), timeout=30.0)
    sock.sendall(f"{token} {rank}\n".encode())
    sock.settimeout(None)
    return sock
