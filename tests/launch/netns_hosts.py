"""Two hosts on one machine: two network namespaces joined by a veth pair.

Each namespace has its own interfaces, addresses and loopback, so processes in different ones
can talk only over the veth link, as processes on two machines talk only over their network.
`two_hosts()` makes them (uniquely named, needs root: skips with the reason otherwise) and removes
them, with any process still running in them, however the test ends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

SUBNET = "10.77.0"  # only inside the two namespaces made here


@dataclass(frozen=True)
class Host:
    ns: str
    ip: str
    interface: str

    def popen(self, argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
        """Starts argv inside this host's namespace (`ip netns exec` becomes the program)."""
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], env=env, **kwargs)

    def pids(self) -> list[int]:
        """Processes still running in this host's namespace."""
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """(host a at SUBNET.1, host b at SUBNET.2), linked by a veth pair; removed on exit."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to make network namespaces")
    tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
    hosts = [
        Host(f"energon-{tag}-{s}", f"{SUBNET}.{i}", f"ev{tag}{s}") for i, s in ((1, "a"), (2, "b"))
    ]
    made: list[Host] = []
    try:
        for host in hosts:
            out = subprocess.run(["ip", "netns", "add", host.ns], capture_output=True, text=True)
            if out.returncode != 0:
                pytest.skip(
                    "making network namespaces is not permitted here (`ip netns add` said: "
                    f"{out.stderr.strip()}); the two-host tests need root"
                )
            made.append(host)
        a, b = hosts
        _ip("link", "add", a.interface, "netns", a.ns, "type", "veth", "peer", "name", b.interface, "netns", b.ns)  # fmt: skip
        for host in hosts:
            _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", host.interface)
            _ip("-n", host.ns, "link", "set", host.interface, "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")
        yield a, b
    finally:
        for host in made:
            for pid in host.pids():  # only processes this test started live there
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
