"""Node failures under the router: resume elsewhere from the relayed tokens (none lost or
repeated), bounded retries, node errors passed through with their code, client cancellation."""

from __future__ import annotations

import time

import grpc
import pytest

from ruyiflow.proto import ruyiflow_pb2 as pb
from tests.router.cluster import EASY_PROMPT

EXPECTED = list(range(100, 108))


def complete_on(cluster, node: str = "edge-0", **kwargs):
    return cluster.client.complete(EASY_PROMPT, max_tokens=8, node=node, **kwargs)


def test_node_dies_mid_stream_and_another_resumes(cluster) -> None:
    cluster.nodes["edge-0"].behaviour.die_after = 3
    done = complete_on(cluster)
    assert done.token_ids == EXPECTED and done.finish_reason == "length"
    resumed = cluster.nodes["edge-1"].generate_requests[-1]
    assert list(resumed.prefix_token_ids) == EXPECTED[:3]
    assert resumed.overrides.exit == 12 and resumed.request_id
    assert [(s.node, s.exit, s.num_tokens) for s in done.trace.spans] == [
        ("edge-0", 12, 3),
        ("edge-1", 12, 5),
    ]
    (move,) = done.trace.handoffs
    assert (move.from_node, move.to_node, move.mode) == ("edge-0", "edge-1", pb.HANDOFF_MODE_TOKENS)
    assert move.reason == pb.HANDOFF_REASON_NODE_FAILURE and move.num_bytes == 12
    assert done.trace.num_retries == 1
    text = cluster.metrics_text()
    assert 'ruyiflow_router_retries_total{tier="edge"} 1.0' in text
    assert 'mode="tokens",reason="node_failure",to_tier="edge"} 1.0' in text


def test_second_failure_moves_to_the_nearest_deeper_exit(cluster) -> None:
    cluster.nodes["edge-0"].behaviour.die_after = 2
    cluster.nodes["edge-1"].behaviour.die_after = 2
    done = complete_on(cluster)
    assert done.token_ids == EXPECTED
    resumed = cluster.nodes["cloud-0"].generate_requests[-1]
    assert list(resumed.prefix_token_ids) == EXPECTED[:4] and resumed.overrides.exit == 20
    assert [s.node for s in done.sources] == ["edge-0"] * 2 + ["edge-1"] * 2 + ["cloud-0"] * 4
    assert done.trace.num_retries == 2


def test_retries_are_bounded(make_cluster) -> None:
    cluster = make_cluster(max_retries=1)
    cluster.nodes["edge-0"].behaviour.die_after = 2
    cluster.nodes["edge-1"].behaviour.die_after = 2
    with pytest.raises(grpc.RpcError) as info:
        complete_on(cluster)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retries" in info.value.details()


def test_stream_ending_without_finish_is_a_failure(cluster) -> None:
    cluster.nodes["edge-0"].behaviour.end_without_finish = True
    done = complete_on(cluster)
    assert done.token_ids == EXPECTED  # edge-1 gets all 8 as prefix and only finishes
    assert list(cluster.nodes["edge-1"].generate_requests[-1].prefix_token_ids) == EXPECTED
    assert done.trace.num_retries == 1


def test_node_server_stopped_mid_stream(cluster) -> None:
    edge = cluster.nodes["edge-0"]
    edge.behaviour.token_delay_s = 0.02
    tokens: list[int] = []
    for chunk in cluster.client.generate(EASY_PROMPT, max_tokens=8, node="edge-0"):
        assert chunk.token_offset == len(tokens)
        tokens.extend(chunk.token_ids)
        if len(tokens) == 3:
            edge.stop()  # the process is gone as far as gRPC can tell
        if chunk.finish_reason:
            assert chunk.trace.num_retries == 1
    assert tokens == EXPECTED


@pytest.mark.parametrize(
    "code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION]
)
def test_node_errors_pass_through(cluster, code) -> None:
    cluster.nodes["edge-0"].behaviour.error = (code, "prompt exceeds max_context 2048")
    with pytest.raises(grpc.RpcError) as info:
        complete_on(cluster)
    assert info.value.code() == code
    assert info.value.details() == "prompt exceeds max_context 2048"
    assert not cluster.nodes["edge-1"].generate_requests  # not retried
    assert 'outcome="invalid",tier="edge"} 1.0' in cluster.metrics_text()


def test_overloaded_node_tries_another(cluster) -> None:
    cluster.nodes["edge-0"].behaviour.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
    done = complete_on(cluster)
    # A full node is not a failure: another node takes the request and no retry is used.
    assert done.token_ids == EXPECTED and done.trace.num_retries == 0
    assert not done.trace.handoffs  # nothing moved: the first node produced nothing
    assert cluster.registry.is_available("edge-0")  # busy is not broken


def test_overloaded_everywhere_passes_through(cluster) -> None:
    for node in cluster.nodes.values():
        node.behaviour.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue is full")
    with pytest.raises(grpc.RpcError) as info:
        complete_on(cluster)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in info.value.details()
    assert ("retry-after-ms", "1000") in info.value.trailing_metadata()  # a retry hint
    assert not cluster.nodes["edge-0"].generate_requests[0].prefix_token_ids


def test_client_cancel_cancels_the_node_stream(cluster) -> None:
    edge = cluster.nodes["edge-0"]
    edge.behaviour.token_delay_s = 0.02
    stream = cluster.client.generate(EASY_PROMPT, max_tokens=200, node="edge-0")
    assert next(stream).token_ids == [100]
    stream.close()
    deadline = time.monotonic() + 5
    while edge.num_cancelled == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert edge.num_cancelled == 1
    while "cancelled" not in cluster.metrics_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 'outcome="cancelled",tier="edge"} 1.0' in cluster.metrics_text()
    assert cluster.servicer.wait_idle(5)
