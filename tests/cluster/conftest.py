"""A real cluster on loopback for the end-to-end tests: router, edge-0 and cloud-0 daemons as
separate processes on ephemeral ports, started once per module and stopped after it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ruyiflow.cmd_up import Cluster

TOPOLOGY = """
models:
  smollm2:
    path: smollm2
    dtype: float32
    extra_exits: [12, 16, 20, 24]
nodes:
  - name: edge-0
    tier: edge
    listen: 127.0.0.1:{edge}
    metrics: 127.0.0.1:{edge_m}
    model: smollm2
    exits: [12, 16]
    max_batch: 8
    max_context: 2048
  - name: cloud-0
    tier: cloud
    listen: 127.0.0.1:{cloud}
    metrics: 127.0.0.1:{cloud_m}
    model: smollm2
    exits: [20, 24, 29]
    max_batch: 8
    max_context: 4096
router:
  listen: 127.0.0.1:{router}
  metrics: 127.0.0.1:{router_m}
  model: smollm2
  scorer: {{name: heuristic}}
  thresholds:
    - {{below: 0.35, exit: 12}}
    - {{below: 0.50, exit: 16}}
    - {{below: 0.65, exit: 20}}
    - {{below: 0.80, exit: 24}}
    - {{exit: 29}}
  escalation: {{enabled: false, window: 4, threshold: 0.3}}
  handoff: {{mode: auto, max_retries: 2, push: true}}
  grace_period_s: 5
links:
  - between: [edge-0, cloud-0]
    bandwidth: 10Gbit
    rtt_ms: 0.05
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_topology(path: Path) -> dict[str, int]:
    names = ["edge", "edge_m", "cloud", "cloud_m", "router", "router_m"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    path.write_text(TOPOLOGY.format(**ports))
    return ports


def start_cluster(root: Path, only: tuple[str, ...] = ()) -> Cluster:
    topo = root / "topology.yaml"
    ports = write_topology(topo)
    c = Cluster(str(topo), log_dir=root / "logs", only=only)
    c.start()
    try:
        c.wait_healthy(timeout=300, progress=False)
    except Exception:
        c.stop(grace=2)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in (root / "logs").glob("*.log"))
        raise RuntimeError(f"cluster did not start:\n{logs}") from None
    c.ports = ports
    c.topology = str(topo)
    c.addr = {k: f"127.0.0.1:{v}" for k, v in ports.items()}
    return c


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
