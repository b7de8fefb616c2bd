"""Fixtures: the real router (gRPC, and the OpenAI API on request) in front of fake nodes
(tests/router's cluster), with router settings of the test's choosing."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator

import pytest

from ruyiflow.router.client import RouterClient
from ruyiflow.router.daemon import RouterDaemon
from tests.router.cluster import DEFAULT_NODES, Cluster, make_topology
from tests.router.fake_node import FakeNode


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c
    c.close()


class FakeCluster:
    """Fake nodes behind a RouterDaemon whose `router:` fields are replaced by `fields`."""

    def __init__(self, http: bool = False, **fields: object) -> None:
        self.nodes = {name: FakeNode(name, tier, exits) for name, tier, exits in DEFAULT_NODES}
        ports = {f"{name}.listen": node.start() for name, node in self.nodes.items()}
        topology = make_topology(DEFAULT_NODES, ports)
        router = dataclasses.replace(topology.router, **fields)  # type: ignore[arg-type]
        self.topology = dataclasses.replace(topology, router=router)
        self.daemon = RouterDaemon(
            self.topology,
            listen="127.0.0.1:0",
            metrics_address="127.0.0.1:0",
            http_address="127.0.0.1:0" if http else "",
            poll_interval_s=0.05,
            rng=random.Random(0),
            serve_metrics=False,
        ).start()
        assert self.daemon.registry.wait_ready(5)
        self.address = f"127.0.0.1:{self.daemon.port}"

    def client(self, **options: object) -> RouterClient:
        return RouterClient(self.address, timeout=30, **options)  # type: ignore[arg-type]

    def close(self) -> None:
        self.daemon.stop(grace=0)
        for node in self.nodes.values():
            node.stop()


@pytest.fixture
def fake_cluster() -> Iterator[Callable[..., FakeCluster]]:
    made: list[FakeCluster] = []

    def make(**options: object) -> FakeCluster:
        made.append(FakeCluster(**options))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for c in made:
        c.close()
