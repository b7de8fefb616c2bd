"""A real cluster on loopback for the end-to-end tests: router, edge-0 and cloud-0 daemons as
separate processes on ephemeral ports, started once per module and stopped after it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ruyiflow.local_cluster import free_ports, start_local_cluster

__all__ = ["free_ports", "start_cluster"]


def start_cluster(root: Path, only: tuple[str, ...] = ()):
    return start_local_cluster(root, only)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop(grace=10)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Only the two node daemons (tests that talk to the Node service directly)."""
    c = start_cluster(tmp_path_factory.mktemp("nodes"), only=("edge-0", "cloud-0"))
    yield c
    c.stop(grace=10)
