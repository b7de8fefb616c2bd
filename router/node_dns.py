"""Node addresses that are DNS names (a Kubernetes pod's or a headless service's): the router
resolves them itself, every few seconds and after a stream failure, and dials the addresses it
found. gRPC's own DNS resolver looks again only after a connection fails (and at most every
30 s), so it would never see the pods a scaled-up node pool adds; here a changed answer gives
the node a new channel over every address found (`ipv4:` / `ipv6:` target, round_robin), while
streams on the old channel finish. IP literals are dialled as given and never resolved."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from ruyiflow.cluster.units import parse_address

Resolver = Callable[[str, int], list[str]]
ROUND_ROBIN = ("grpc.lb_policy_name", "round_robin")


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def resolve(host: str, port: int) -> list[str]:
    """IP addresses of `host` (empty when it does not resolve now), IPv4 first, sorted."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    found = {info[4][0] for info in infos}
    return sorted(found, key=lambda a: (":" in a, a))


def dns_host(address: str) -> tuple[str, int] | None:
    """(host, port) when `address` names its host by DNS, else None (an IP literal)."""
    host, port = parse_address(address)
    return None if is_ip(host) else (host, port)


def channel_target(address: str, ips: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """gRPC target and extra channel options for `address` resolved to `ips`: the address
    itself when it is an IP literal or nothing resolved (gRPC's resolver then tries), else every
    address of one family, balanced round-robin."""
    if dns_host(address) is None or not ips:
        return address, []
    port = parse_address(address)[1]
    v4 = [ip for ip in ips if ":" not in ip]
    if v4:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip in v4), [ROUND_ROBIN]
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip in ips), [ROUND_ROBIN]
