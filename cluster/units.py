"""String spellings accepted in topology.yaml: `host:port` addresses and link bandwidths.

Both parsers raise `TopologyError` with no path; callers attach the field path.
"""

from __future__ import annotations

import ipaddress
import math
import re

from ruyiflow.cluster.errors import TopologyError

_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})")
_BANDWIDTH = re.compile(r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)(/s)?")
_PREFIXES = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_PREFIXES |= {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}
# Longest suffix first so "bits" is not read as prefix "bit" + unit "s".
_UNITS = (("bps", 1 / 8), ("bits", 1 / 8), ("bit", 1 / 8), ("bytes", 1.0), ("byte", 1.0))
_UNITS += (("b", 1 / 8), ("B", 1.0))


def parse_address(value: str, allow_zero: bool = False) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:port`) into (host without brackets, port); port 0
    (any free port) only with `allow_zero`."""
    match = _ADDRESS.fullmatch(value)
    if match is None:
        raise TopologyError(f"bad address {value!r}: expected host:port")
    host, port = match.group(1), int(match.group(2))
    try:
        if host.startswith("["):
            host = str(ipaddress.IPv6Address(host[1:-1]))
        elif re.fullmatch(r"[0-9.]+", host):
            ipaddress.IPv4Address(host)
    except ValueError:
        raise TopologyError(f"bad address {value!r}: invalid IP {host!r}") from None
    lowest = 0 if allow_zero else 1
    if not lowest <= port <= 65535:
        raise TopologyError(f"bad address {value!r}: port must be in {lowest}..65535")
    return host, port


def format_address(host: str, port: int) -> str:
    """Inverse of `parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_bandwidth(value: str | float) -> float:
    """Bandwidth in bytes/s from a number (bytes/s) or a string: '1Gbit', '100 Mbps', '125MB/s',
    '1GiB/s'. Bits: 'bit', 'b', 'bps'; bytes: 'B', 'byte(s)'; prefixes k M G T and Ki Mi Gi Ti."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number, unit = float(value), "B"
    else:
        match = _BANDWIDTH.fullmatch(str(value).strip())
        if match is None:
            raise TopologyError(f"bad bandwidth {value!r}: expected e.g. 1Gbit or 125MB/s")
        number, unit = float(match.group(1)), match.group(2) or "B"
    for suffix, scale in _UNITS:
        prefix = unit[: -len(suffix)]
        if unit.endswith(suffix) and prefix in _PREFIXES:
            bytes_per_s = number * _PREFIXES[prefix] * scale
            if not (bytes_per_s > 0 and math.isfinite(bytes_per_s)):
                raise TopologyError(f"bad bandwidth {value!r}: must be positive")
            return bytes_per_s
    raise TopologyError(f"bad bandwidth {value!r}: unknown unit {unit!r}")
