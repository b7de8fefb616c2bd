"""Node gauges that come from the engine's queues are read at scrape time."""

from __future__ import annotations

from ruyiflow.node.metrics import NodeMetrics


def test_running_and_queued_follow_the_engine_queues() -> None:
    metrics = NodeMetrics("edge-0", "edge")
    load = [(3, 5, 100)]
    metrics.watch_load(lambda: load[0])
    text = metrics.exposition().decode()
    assert 'ruyiflow_node_running{node="edge-0",tier="edge"} 3.0' in text
    assert 'ruyiflow_node_queued{node="edge-0",tier="edge"} 5.0' in text
    load[0] = (0, 1, 7)
    text = metrics.exposition().decode()
    assert 'ruyiflow_node_running{node="edge-0",tier="edge"} 0.0' in text
    assert 'ruyiflow_node_queued{node="edge-0",tier="edge"} 1.0' in text
