"""Fixtures for router tests: an in-process cluster of fake nodes behind the real router."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.router.cluster import Cluster


@pytest.fixture
def make_cluster() -> Iterator[Callable[..., Cluster]]:
    """Factory: `make_cluster(nodes=..., push=..., max_retries=..., mode=...)`; all are closed
    at teardown."""
    clusters: list[Cluster] = []

    def make(**kwargs: object) -> Cluster:
        clusters.append(Cluster(**kwargs))  # type: ignore[arg-type]
        return clusters[-1]

    yield make
    for cluster in clusters:
        cluster.close()


@pytest.fixture
def cluster(make_cluster: Callable[..., Cluster]) -> Cluster:
    """The default cluster: edge-0 and edge-1 serving exits 12, 16; cloud-0 serving 20, 24, 29."""
    return make_cluster()
