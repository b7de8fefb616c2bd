"""Validation helpers of the topology specs (`cluster.topology`, `cluster.node_spec`,
`cluster.router_spec`): each raises `TopologyError` with the field path relative to the spec that
checks it."""

from __future__ import annotations

import re

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.units import parse_address

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENGINE_URL_RE = re.compile(r"https?://[^/\s:]+(:\d{1,5})?(/\S*)?")


def check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise TopologyError(message, path)


def check_name(value: str, path: str) -> None:
    check(
        bool(NAME_RE.fullmatch(value)), path, f"bad name {value!r}: use [A-Za-z0-9_-], 1-63 chars"
    )


def check_one_of(value: str, allowed: tuple[str, ...], path: str) -> None:
    check(value in allowed, path, f"{value!r} is not one of {', '.join(allowed)}")


def check_exits(exits: tuple[int, ...], path: str, allow_empty: bool) -> None:
    check(allow_empty or len(exits) > 0, path, "must list at least one exit")
    for i, exit_ in enumerate(exits):
        check(exit_ >= 1, f"{path}[{i}]", f"exit {exit_} must be a layer index >= 1")
        check(i == 0 or exit_ > exits[i - 1], f"{path}[{i}]", "exits must be strictly increasing")


def check_addresses(spec: object, keys: tuple[str, ...]) -> None:
    """Each `host:port` field of `spec` named in `keys` parses (errors name the field)."""
    for key in keys:
        try:
            parse_address(getattr(spec, key))
        except TopologyError as exc:
            raise TopologyError(exc.problem, key) from None
