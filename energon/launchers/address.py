"""Controller addresses across hosts: `tcp://HOST:PORT` where HOST is an IPv4 address, a host
name, a network interface (`eth0`, `ib0`) or a wildcard, and which interface reaches a peer.

The controller binds its ZeroMQ socket and its rendezvous store to one address and hands the
workers an address they can reach: binding to an interface means advertising that interface's
address; binding to a wildcard (`0.0.0.0`, `*`) advertises the address of the host name, or else
of the first interface that is up and not loopback.
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from dataclasses import dataclass

from energon.errors import InvalidRequest

SIOCGIFADDR = 0x8915  # linux/sockios.h: get an interface's IPv4 address
WILDCARDS = ("*", "0.0.0.0")


@dataclass(frozen=True)
class TcpAddress:
    """Where the controller binds (`bind`) and what workers are told (`advertised`)."""

    bind_host: str
    advertised_host: str
    port: int

    @property
    def bind(self) -> str:
        return f"tcp://{self.bind_host}:{self.port}"

    @property
    def advertised(self) -> str:
        return f"tcp://{self.advertised_host}:{self.port}"

    def with_port(self, port: int) -> TcpAddress:
        return TcpAddress(self.bind_host, self.advertised_host, port)


def split_tcp(field: str, address: str, *, any_port: bool = True) -> tuple[str, int]:
    """("HOST", PORT) of "tcp://HOST:PORT"; any_port False refuses port 0 (workers must be told
    a port in advance). Raises InvalidRequest(field) for anything else."""
    if not isinstance(address, str) or not address.startswith("tcp://"):
        raise InvalidRequest(field, f"must look like 'tcp://HOST:PORT' (got {address!r})")
    host, sep, port = address[len("tcp://") :].rpartition(":")
    low = 0 if any_port else 1
    if not sep or not host or not port.isdigit() or not low <= int(port) <= 65535:
        raise InvalidRequest(
            field, f"must look like 'tcp://HOST:PORT' with PORT in [{low}, 65535] (got {address!r})"
        )
    return host, int(port)


def interface_ipv4(name: str) -> str | None:
    """The IPv4 address of network interface `name` (Linux), or None if it has none."""
    if not name or len(name.encode()) > 15:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def interface_of(ip: str) -> str | None:
    """The name of the interface that holds IPv4 address `ip`, or None."""
    for _, name in socket.if_nameindex():
        if interface_ipv4(name) == ip:
            return name
    return None


def source_ip_towards(host: str) -> str | None:
    """The local IPv4 address this host uses to reach `host` (a routing look-up: connecting a
    UDP socket sends nothing), or None when there is no route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
        except OSError:
            return None
        return s.getsockname()[0]


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _this_host_ip() -> str:
    """An address of this host that others can reach: its host name's, if an interface here
    holds it, else the first interface's that is not loopback, else 127.0.0.1."""
    try:
        ip = socket.gethostbyname(socket.gethostname())
        if not ip.startswith("127.") and interface_of(ip) is not None:
            return ip
    except OSError:
        pass
    for _, name in socket.if_nameindex():
        ip = interface_ipv4(name)
        if ip is not None and not ip.startswith("127."):
            return ip
    return "127.0.0.1"


def resolve(field: str, address: str, *, any_port: bool = True) -> TcpAddress:
    """Where to bind and what to advertise for "tcp://HOST:PORT". May look up a host name
    (blocking: call it from a thread). Raises InvalidRequest(field) for a malformed address or a
    HOST that is neither an address, an interface with an IPv4 address, nor a known host name."""
    host, port = split_tcp(field, address, any_port=any_port)
    if host in WILDCARDS:
        return TcpAddress("0.0.0.0", _this_host_ip(), port)
    if _is_ipv4(host):
        return TcpAddress(host, host, port)
    ip = interface_ipv4(host)
    if ip is None:
        try:
            ip = socket.gethostbyname(host)
        except OSError:
            raise InvalidRequest(
                field,
                f"names {host!r}, which is no IPv4 address, network interface of this host "
                "nor a host name that resolves",
            ) from None
    return TcpAddress(ip, ip, port)
