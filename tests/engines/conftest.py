"""Fixtures for nodes backed by external engines: a scripted engine (always available) and a
real llama.cpp server (llama-cpp-python, built by scripts/install.sh; skipped only where the
build was impossible, never in CI)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ruyiflow.cloud_node.daemon import open_cloud_backend
from ruyiflow.cluster.topology import Topology
from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.local_cluster import free_ports
from ruyiflow.node.daemon import run_node
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from tests.engines.scripted_engine import MODEL, ScriptedEngine

NODE_TOPOLOGY = """
models:
  smollm2: {{path: smollm2, extra_exits: [12, 16, 20, 24]}}
nodes:
  - name: cloud-x
    tier: cloud
    listen: 127.0.0.1:{node}
    metrics: 127.0.0.1:{metrics}
    model: smollm2
    exits: [24]
    backend: openai
    base_url: {base_url}
    served_model: {model}
    timeout_s: 1.5
    max_context: {max_context}{tokenizer}
router:
  listen: 127.0.0.1:{router}
  metrics: 127.0.0.1:{router_metrics}
  http: ''
  thresholds: [{{exit: 24}}]
"""


@dataclass
class InProcessNode:
    """A cloud node daemon on a thread of the test process."""

    topology: Topology
    address: str
    stop_event: threading.Event
    thread: threading.Thread
    channel: grpc.Channel

    @property
    def stub(self) -> pb_grpc.NodeStub:
        return pb_grpc.NodeStub(self.channel)

    def health(self) -> int:
        try:
            reply = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return -1
        return reply.status

    def wait_health(self, serving: bool, timeout: float = 30) -> None:
        wanted = health_pb2.HealthCheckResponse.SERVING if serving else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.health()
            if (status == wanted) if serving else status != health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
        raise TimeoutError(f"node health did not become {'SERVING' if serving else 'down'}")

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)
        self.channel.close()


def start_node(
    base_url: str, model: str = MODEL, max_context: int = 1024, tokenizer: str | None = None
) -> InProcessNode:
    """`tokenizer`: the node's field (`none`: without one); unset, the model's (smollm2's)."""
    names = ("node", "metrics", "router", "router_metrics")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    line = f"\n    tokenizer: {tokenizer}" if tokenizer else ""
    text = NODE_TOPOLOGY.format(
        base_url=base_url, model=model, max_context=max_context, tokenizer=line, **ports
    )
    topology = parse_topology(text)
    stop = threading.Event()
    thread = threading.Thread(
        target=run_node,
        args=(topology, "cloud-x", "cloud", stop),
        kwargs={"open_backend": open_cloud_backend},
        daemon=True,
    )
    thread.start()
    address = f"127.0.0.1:{ports['node']}"
    return InProcessNode(topology, address, stop, thread, grpc.insecure_channel(address))


@pytest.fixture
def scripted() -> Iterator[ScriptedEngine]:
    engine = ScriptedEngine().start()
    yield engine
    engine.stop()


@pytest.fixture
def scripted_node(scripted: ScriptedEngine) -> Iterator[tuple[ScriptedEngine, InProcessNode]]:
    node = start_node(scripted.base_url)
    try:
        node.wait_health(serving=True)
        yield scripted, node
    finally:
        node.stop()


def require_llama_cpp() -> None:
    """Skip (with the reason) where llama-cpp-python could not be built; in CI it must be
    there (scripts/install.sh builds it), so there its absence fails the test."""
    import importlib.util
    import os
    from pathlib import Path

    if importlib.util.find_spec("llama_cpp") is not None:
        return
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ruyiflow"
    failed = sorted((cache / "wheels").glob("*.failed"))
    why = failed[-1].read_text() if failed else "llama-cpp-python is not installed"
    message = f"llama.cpp server unavailable: {why.strip()} (scripts/install.sh builds it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
