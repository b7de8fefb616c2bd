"""A whole topology on this machine with ephemeral loopback ports (tests and benchmarks): the
default layout (router, edge-0 with exits 12/16, cloud-0 with 20/24/29) of the embedded model."""

from __future__ import annotations

import socket
from pathlib import Path

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
  http: 127.0.0.1:{router_http}
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


# The default layout's edge node, and in the cloud a node in front of a llama.cpp server
# (`ruyiflow up` starts it from `command:`) serving the same GGUF file as the whole model.
ENGINE_TOPOLOGY = """
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
  - name: cloud-llama
    tier: cloud
    listen: 127.0.0.1:{cloud}
    metrics: 127.0.0.1:{cloud_m}
    model: smollm2
    exits: [29]
    backend: openai
    base_url: http://127.0.0.1:{engine}/v1
    served_model: smollm2
    max_batch: 16
    max_context: 2048
    timeout_s: 30
    command: ["{{python}}", -m, llama_cpp.server, --model, "{{smollm2_gguf}}",
              --model_alias, smollm2, --host, 127.0.0.1, --port, "{engine}", --n_ctx, "2048",
              --n_threads, "1", --n_threads_batch, "1", --interrupt_requests, "false",
              --verbose, "false"]
router:
  listen: 127.0.0.1:{router}
  metrics: 127.0.0.1:{router_m}
  http: ''
  model: smollm2
  scorer: {{name: heuristic}}
  thresholds:
    - {{below: 0.35, exit: 12}}
    - {{below: 0.50, exit: 16}}
    - {{exit: 29}}
  escalation: {{enabled: false, window: 4, threshold: 0.3}}
  handoff: {{mode: auto, max_retries: 2, push: true}}
  grace_period_s: 5
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def write_topology(path: Path, template: str = TOPOLOGY) -> dict[str, int]:
    names = ["edge", "edge_m", "cloud", "cloud_m", "router", "router_m", "router_http"]
    if "{engine}" in template:  # ENGINE_TOPOLOGY or a variant of it
        names.append("engine")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    path.write_text(template.format(**ports))
    return ports


def start_local_cluster(
    root: Path, only: tuple[str, ...] = (), timeout: float = 300, template: str = TOPOLOGY
) -> Cluster:
    """Write a topology with free ports under `root`, start its processes, wait until healthy.
    The returned Cluster has `.addr` (name -> host:port) and `.topology` (file path).
    `template=ENGINE_TOPOLOGY`: cloud-llama in front of a llama.cpp server (`.addr["engine"]`)."""
    root.mkdir(parents=True, exist_ok=True)
    topo = root / "topology.yaml"
    ports = write_topology(topo, template)
    c = Cluster(str(topo), log_dir=root / "logs", only=only)
    c.start()
    try:
        c.wait_healthy(timeout=timeout, progress=False)
    except Exception:
        c.stop(grace=2)
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in (root / "logs").glob("*.log")
        )
        raise RuntimeError(f"cluster did not start:\n{logs}") from None
    c.topology = str(topo)
    c.addr = {k: f"127.0.0.1:{v}" for k, v in ports.items()}
    return c
