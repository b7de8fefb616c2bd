"""Node registry: health + Info polling, late nodes, failure marks, load combination."""

from __future__ import annotations

import time

import pytest

from ruyiflow.router.metrics import RouterMetrics
from ruyiflow.router.registry import NodeRegistry
from tests.router.cluster import DEFAULT_NODES, free_port, make_topology
from tests.router.fake_node import FINGERPRINT, FakeNode


@pytest.fixture
def setup():
    """Two live fake nodes and one (cloud-0) whose port nobody listens on yet."""
    nodes = {name: FakeNode(name, tier, exits) for name, tier, exits in DEFAULT_NODES}
    ports = {f"{n}.listen": nodes[n].start() for n in ("edge-0", "edge-1")}
    ports["cloud-0.listen"] = free_port()
    topology = make_topology(DEFAULT_NODES, ports)
    metrics = RouterMetrics(tuple(nodes), (12, 16, 20, 24, 29))
    registry = NodeRegistry(topology, metrics, poll_interval_s=0.05, rpc_timeout_s=0.5)
    yield nodes, topology, metrics, registry
    registry.close()
    for node in nodes.values():
        node.stop()


def test_poll_records_health_and_info(setup) -> None:
    nodes, topology, metrics, registry = setup
    registry.poll_once()
    assert registry.is_available("edge-0") and not registry.is_available("cloud-0")
    info = registry.info("edge-0")
    assert info is not None and info.model_fingerprint == FINGERPRINT
    assert list(info.exits) == [12, 16] and info.shape.hidden_size == 576
    assert registry.info("cloud-0") is None
    text = metrics.exposition().decode()
    assert 'ruyiflow_router_node_up{node="edge-0"} 1.0' in text
    assert 'ruyiflow_router_node_up{node="cloud-0"} 0.0' in text
    statuses = registry.statuses()
    assert [s.name for s in statuses] == ["edge-0", "edge-1", "cloud-0"]
    assert statuses[0].last_seen_ms_ago >= 0 and not statuses[2].HasField("last_seen_ms_ago")


def test_late_node_becomes_ready(setup) -> None:
    nodes, topology, _, registry = setup
    registry.start()
    assert registry.wait_ready(2, ["edge-0", "edge-1"])
    assert not registry.wait_ready(0.1)
    nodes["cloud-0"].start(topology.node("cloud-0").listen)
    assert registry.wait_ready(5)


def test_mark_failed_holds_until_a_later_poll(setup) -> None:
    _, _, metrics, registry = setup
    registry.poll_once()
    registry.mark_failed("edge-0")
    assert not registry.is_available("edge-0")
    assert 'ruyiflow_router_node_up{node="edge-0"} 0.0' in metrics.exposition().decode()
    time.sleep(0.001)
    registry.poll_once()  # started after the failure: its good news counts
    assert registry.is_available("edge-0")


def test_stopped_node_turns_unhealthy(setup) -> None:
    nodes, _, _, registry = setup
    registry.poll_once()
    nodes["edge-1"].stop()
    registry.poll_once()
    assert not registry.is_available("edge-1") and registry.is_available("edge-0")


def test_loads_take_the_larger_of_report_and_own_count(setup) -> None:
    nodes, _, _, registry = setup
    nodes["edge-0"].num_running = 5
    registry.poll_once()
    registry.acquire("edge-1", 300)
    registry.acquire("edge-1", 200)
    loads = {load.name: load for load in registry.loads(["edge-0", "edge-1", "cloud-0"])}
    assert loads["edge-0"].running == 5 and loads["edge-0"].outstanding_tokens == 0
    assert loads["edge-1"].running == 2 and loads["edge-1"].outstanding_tokens == 500
    assert not loads["cloud-0"].healthy
    registry.release("edge-1", 300)
    registry.release("edge-1", 200)
    assert registry.loads(["edge-1"])[0].running == 0
