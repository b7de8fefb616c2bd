"""An in-process test cluster: fake node servers on ephemeral loopback ports and the real router
daemon (registry, servicer, gRPC server, metrics HTTP server) in front of them."""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence

from ruyiflow.cluster.topology import Topology
from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.router.client import RouterClient
from ruyiflow.router.daemon import RouterDaemon
from tests.router.fake_node import FakeNode

DEFAULT_NODES = (
    ("edge-0", "edge", (12, 16)),
    ("edge-1", "edge", (12, 16)),
    ("cloud-0", "cloud", (20, 24, 29)),
)
EASY_PROMPT = "Hi there!"
HARD_PROMPT = (
    "Prove step by step why the integral of x^2 from 0 to 3 equals 9, then explain the "
    "derivation and write a python function that computes it."
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def topology_text(
    nodes: Sequence[tuple[str, str, tuple[int, ...]]],
    ports: dict[str, int],
    push: bool = True,
    max_retries: int = 2,
    mode: str = "auto",
    bandwidth: str = "10Gbit",
) -> str:
    """topology.yaml text; `ports` keys as in `Topology.endpoints()` (others get dummies)."""

    def address(key: str, default: int) -> str:
        return f"'127.0.0.1:{ports.get(key, default)}'"

    lines = ["models:", "  smollm2: {path: smollm2, extra_exits: [12, 16, 20, 24]}", "nodes:"]
    for i, (name, tier, exits) in enumerate(nodes):
        lines.append(
            f"  - {{name: {name}, tier: {tier}, listen: {address(name + '.listen', 20000 + i)}, "
            f"metrics: {address(name + '.metrics', 21000 + i)}, model: smollm2, "
            f"exits: {list(exits)}}}"
        )
    lines += [
        "router:",
        f"  listen: {address('router.listen', 19999)}",
        f"  metrics: {address('router.metrics', 19998)}",
        f"  http: {address('router.http', 0) if 'router.http' in ports else repr('')}",
        "  thresholds:",
        "    - {below: 0.35, exit: 12}",
        "    - {below: 0.50, exit: 16}",
        "    - {below: 0.65, exit: 20}",
        "    - {below: 0.80, exit: 24}",
        "    - {exit: 29}",
        f"  handoff: {{mode: {mode}, max_retries: {max_retries}, push: {str(push).lower()}}}",
        "  grace_period_s: 5",
        "links:",
        f"  - {{between: [edge-0, cloud-0], bandwidth: {bandwidth}, rtt_ms: 0.05}}",
    ]
    return "\n".join(lines) + "\n"


def make_topology(
    nodes: Sequence[tuple[str, str, tuple[int, ...]]], ports: dict[str, int], **options: object
) -> Topology:
    return parse_topology(topology_text(nodes, ports, **options), source="<test>")  # type: ignore[arg-type]


class Cluster:
    """Fake nodes + a started RouterDaemon + a client; `close()` stops everything. The OpenAI
    HTTP API is served only with an `http_address`."""

    def __init__(
        self,
        nodes: Sequence[tuple[str, str, tuple[int, ...]]] = DEFAULT_NODES,
        serve_metrics: bool = False,
        http_address: str = "",
        **topology_options: object,
    ) -> None:
        self.nodes = {name: FakeNode(name, tier, exits) for name, tier, exits in nodes}
        ports = {f"{name}.listen": node.start() for name, node in self.nodes.items()}
        self.topology = make_topology(nodes, ports, **topology_options)  # type: ignore[arg-type]
        self.daemon = RouterDaemon(
            self.topology,
            listen="127.0.0.1:0",
            metrics_address="127.0.0.1:0",
            http_address=http_address,  # "127.0.0.1:0" serves the OpenAI API on a free port
            poll_interval_s=0.05,
            rng=random.Random(0),
            serve_metrics=serve_metrics,  # its HTTP server takes 0.5 s to stop
        ).start()
        self.registry = self.daemon.registry
        self.servicer = self.daemon.servicer
        assert self.registry.wait_ready(5), "fake nodes did not turn healthy"
        self.address = f"127.0.0.1:{self.daemon.port}"
        self.client = RouterClient(self.address, timeout=10)

    def metrics_text(self) -> str:
        return self.daemon.metrics.exposition().decode()

    def close(self) -> None:
        self.client.close()
        self.daemon.stop(grace=0)
        for node in self.nodes.values():
            node.stop()
