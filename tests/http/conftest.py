"""Fixtures for the OpenAI API tests: a real cluster shared by the whole package - the router
(HTTP API on a free port) and one node daemon serving every exit of the embedded SmolLM2, one
model load being most of its start-up time - and a router in front of fake nodes
(tests/router/fake_node.py) per module, where no model is needed."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from ruyiflow.cmd_up import Cluster as Processes
from ruyiflow.local_cluster import free_ports
from tests.router.cluster import Cluster

TOPOLOGY = """
models:
  smollm2: {{path: smollm2, extra_exits: [12, 16, 20, 24]}}
nodes:
  - {{name: node-0, tier: cloud, listen: '127.0.0.1:{p[0]}', metrics: '127.0.0.1:{p[1]}',
      model: smollm2, exits: [12, 16, 20, 24, 29], max_batch: 8, max_context: 2048}}
router:
  listen: '127.0.0.1:{p[2]}'
  metrics: '127.0.0.1:{p[3]}'
  http: '127.0.0.1:{p[4]}'
  thresholds:
    - {{below: 0.35, exit: 12}}
    - {{below: 0.65, exit: 20}}
    - {{exit: 29}}
  escalation: {{enabled: false}}
  grace_period_s: 2
"""


def api_client(address: str) -> openai.OpenAI:
    # No retries: the error tests want the first answer, and a retry would hide a 503.
    return openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def real(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Addresses of the real cluster: router, router_metrics, http, node, node_metrics."""
    root = tmp_path_factory.mktemp("http-cluster")
    ports = free_ports(5)
    (root / "topology.yaml").write_text(TOPOLOGY.format(p=ports))
    processes = Processes(str(root / "topology.yaml"), log_dir=root / "logs")
    processes.start()
    try:
        processes.wait_healthy(timeout=300, progress=False)
        names = ("node", "node_metrics", "router", "router_metrics", "http")
        yield {name: f"127.0.0.1:{port}" for name, port in zip(names, ports, strict=True)}
    finally:
        processes.stop(grace=5)


@pytest.fixture(scope="session")
def real_api(real) -> openai.OpenAI:
    return api_client(real["http"])


@pytest.fixture(scope="module")
def fake() -> Iterator[Cluster]:
    cluster = Cluster(http_address="127.0.0.1:0")
    yield cluster
    cluster.close()


@pytest.fixture
def fake_api(fake: Cluster) -> openai.OpenAI:
    return api_client(f"127.0.0.1:{fake.daemon.http_port}")
