"""Mid-generation moves through the router: node-to-node push, relay fallback, modes from the
cost model and overrides, same-node branch switches, refused states; token continuity and the
route trace."""

from __future__ import annotations

import grpc

from ruyiflow.proto import ruyiflow_pb2 as pb
from tests.router.cluster import EASY_PROMPT
from tests.router.fake_node import HIDDEN_PAYLOAD

EXPECTED = list(range(100, 108))  # the fake nodes' tokens 0..7
ESCALATE_TO_CLOUD = {"force_after_tokens": 3, "force_to_exit": 20}


def escalate(cluster, **kwargs):
    """8 tokens, starting on edge-0 at exit 12, forced to exit 20 (cloud-0) after 3."""
    options = {"max_tokens": 8, "node": "edge-0", "exit": 12, "escalation": ESCALATE_TO_CLOUD}
    return cluster.client.complete(EASY_PROMPT, **(options | kwargs))


def spans(done) -> list[tuple[str, int, int]]:
    return [(s.node, s.exit, s.num_tokens) for s in done.trace.spans]


def test_push_handoff_edge_to_cloud(cluster) -> None:
    done = escalate(cluster)
    assert done.token_ids == EXPECTED and done.finish_reason == "length"
    assert [s.node for s in done.sources] == ["edge-0"] * 3 + ["cloud-0"] * 5
    assert spans(done) == [("edge-0", 12, 3), ("cloud-0", 20, 5)]
    (move,) = done.trace.handoffs
    assert (move.from_node, move.from_exit, move.to_node, move.to_exit) == (
        "edge-0",
        12,
        "cloud-0",
        20,
    )
    # 7 tokens of context over a 10 Gbit link: hidden states beat a re-prefill.
    assert move.mode == pb.HANDOFF_MODE_HIDDEN and move.pushed
    assert move.num_bytes == len(HIDDEN_PAYLOAD)
    assert move.reason == pb.HANDOFF_REASON_FORCED and move.duration_ms > 0
    (push,) = cluster.nodes["edge-0"].push_requests
    assert push.destination == cluster.topology.node("cloud-0").listen
    assert (push.state.mode, push.state.to_exit) == (pb.HANDOFF_MODE_HIDDEN, 20)
    header = cluster.nodes["cloud-0"].resume_headers[-1]
    assert header.transfer_id == push.transfer_id and header.to_exit == 20
    assert header.request_id and header.mode == pb.HANDOFF_MODE_HIDDEN
    assert not cluster.nodes["edge-0"].fetch_requests


def test_relay_when_push_fails(cluster) -> None:
    cluster.nodes["edge-0"].behaviour.fail_push = True
    done = escalate(cluster)
    assert done.token_ids == EXPECTED
    (move,) = done.trace.handoffs
    assert not move.pushed and move.mode == pb.HANDOFF_MODE_HIDDEN
    assert move.num_bytes > len(HIDDEN_PAYLOAD)  # header + payload + end, as relayed
    assert len(cluster.nodes["edge-0"].push_requests) == 1
    (fetch,) = cluster.nodes["edge-0"].fetch_requests
    assert fetch.to_exit == 20
    header = cluster.nodes["cloud-0"].resume_headers[-1]
    assert not header.transfer_id and header.to_exit == 20
    assert list(header.generated_token_ids) == EXPECTED[:3]


def test_relay_when_topology_disables_push(make_cluster) -> None:
    cluster = make_cluster(push=False)
    done = escalate(cluster)
    assert done.token_ids == EXPECTED and not done.trace.handoffs[0].pushed
    assert not cluster.nodes["edge-0"].push_requests


def test_tokens_mode_override(cluster) -> None:
    done = escalate(cluster, handoff_mode="tokens")
    assert done.token_ids == EXPECTED
    move = done.trace.handoffs[0]
    assert move.mode == pb.HANDOFF_MODE_TOKENS and move.pushed and move.num_bytes == 0
    assert cluster.nodes["edge-0"].push_requests[0].state.mode == pb.HANDOFF_MODE_TOKENS


def test_cost_model_picks_tokens_on_a_slow_link(make_cluster) -> None:
    cluster = make_cluster(bandwidth="1Mbit")
    done = escalate(cluster)
    assert done.token_ids == EXPECTED
    assert done.trace.handoffs[0].mode == pb.HANDOFF_MODE_TOKENS


def test_topology_mode_hidden(make_cluster) -> None:
    cluster = make_cluster(bandwidth="1Mbit", mode="hidden")
    assert escalate(cluster).trace.handoffs[0].mode == pb.HANDOFF_MODE_HIDDEN


def test_branch_switch_on_one_node(cluster) -> None:
    done = escalate(cluster, escalation={"force_after_tokens": 3, "force_to_exit": 16})
    assert done.token_ids == EXPECTED
    assert spans(done) == [("edge-0", 12, 3), ("edge-0", 16, 5)]
    (move,) = done.trace.handoffs
    assert (move.from_node, move.to_node, move.from_exit, move.to_exit) == (
        "edge-0",
        "edge-0",
        12,
        16,
    )
    assert move.mode == pb.HANDOFF_MODE_UNSPECIFIED and move.num_bytes == 0
    assert move.reason == pb.HANDOFF_REASON_LOW_CONFIDENCE and not move.pushed
    text = cluster.metrics_text()
    assert 'ruyiflow_router_escalations_total{from_tier="edge",reason="low_confidence"' in text


def test_refused_state_falls_back_to_tokens(cluster) -> None:
    cloud = cluster.nodes["cloud-0"]
    cloud.behaviour.resume_error = (grpc.StatusCode.FAILED_PRECONDITION, "foreign fingerprint")
    done = escalate(cluster)
    assert done.token_ids == EXPECTED
    assert list(cloud.generate_requests[-1].prefix_token_ids) == EXPECTED[:3]
    assert cloud.generate_requests[-1].overrides.exit == 20
    # The refused hidden move is replaced by a tokens move from the same source.
    (move,) = done.trace.handoffs
    assert (move.from_node, move.from_exit, move.to_node, move.to_exit) == (
        "edge-0",
        12,
        "cloud-0",
        20,
    )
    assert move.mode == pb.HANDOFF_MODE_TOKENS and move.reason == pb.HANDOFF_REASON_FORCED
    assert move.num_bytes == 4 * 3 and not move.pushed
    assert spans(done) == [("edge-0", 12, 3), ("cloud-0", 20, 5)]
    assert done.trace.num_retries == 1


def test_relay_source_failure_resumes_from_tokens(cluster) -> None:
    edge = cluster.nodes["edge-0"]
    edge.behaviour.fail_push, edge.behaviour.fail_fetch = True, grpc.StatusCode.UNAVAILABLE
    done = escalate(cluster)
    assert done.token_ids == EXPECTED
    cloud = cluster.nodes["cloud-0"]
    assert list(cloud.generate_requests[-1].prefix_token_ids) == EXPECTED[:3]
    (move,) = done.trace.handoffs
    assert move.reason == pb.HANDOFF_REASON_NODE_FAILURE and move.from_node == "edge-0"
    assert move.mode == pb.HANDOFF_MODE_TOKENS and move.to_exit == 20
    assert [s.node for s in done.sources][3:] == ["cloud-0"] * 5


def test_no_deeper_node_continues_without_escalating(cluster) -> None:
    cluster.nodes["cloud-0"].stop()
    cluster.registry.mark_failed("cloud-0")
    done = escalate(cluster)
    assert done.token_ids == EXPECTED
    edges = [cluster.nodes[name] for name in ("edge-0", "edge-1")]
    (retry,) = [r for node in edges for r in node.generate_requests if r.prefix_token_ids]
    assert list(retry.prefix_token_ids) == EXPECTED[:3] and retry.overrides.exit == 12
    assert retry.escalation.enabled is False
    assert done.trace.num_retries == 0 and done.trace.handoffs[0].reason == pb.HANDOFF_REASON_FORCED


def test_lost_state_resumes_from_tokens_without_blame(cluster) -> None:
    edge = cluster.nodes["edge-0"]
    edge.behaviour.fail_push, edge.behaviour.fail_fetch = True, grpc.StatusCode.NOT_FOUND
    done = escalate(cluster)
    assert done.token_ids == EXPECTED
    (move,) = done.trace.handoffs
    assert move.reason == pb.HANDOFF_REASON_FORCED and move.mode == pb.HANDOFF_MODE_TOKENS
    assert cluster.registry.is_available("edge-0")  # alive, just without the state
