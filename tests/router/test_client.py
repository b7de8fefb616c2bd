"""Router client: request building, offset continuity checks, trace formatting and JSON."""

from __future__ import annotations

import json

import pytest

from ruyiflow.cluster.grpc_server import serve_grpc
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.client import (
    RouterClient,
    StreamGapError,
    build_request,
    format_trace,
    trace_to_dict,
)

TRACE = pb.RouteTrace(
    spans=[
        pb.RouteSpan(node="edge-0", tier=pb.TIER_EDGE, exit=12, num_tokens=3),
        pb.RouteSpan(node="edge-0", tier=pb.TIER_EDGE, exit=16, num_tokens=2),
        pb.RouteSpan(node="cloud-0", tier=pb.TIER_CLOUD, exit=20, num_tokens=5),
    ],
    handoffs=[
        pb.HandoffRecord(
            from_node="edge-0",
            to_node="edge-0",
            from_exit=12,
            to_exit=16,
            reason=pb.HANDOFF_REASON_LOW_CONFIDENCE,
        ),
        pb.HandoffRecord(
            from_node="edge-0",
            to_node="cloud-0",
            from_exit=16,
            to_exit=20,
            mode=pb.HANDOFF_MODE_HIDDEN,
            num_bytes=2_500_000,
            duration_ms=3.25,
            reason=pb.HANDOFF_REASON_FORCED,
            pushed=True,
        ),
    ],
    difficulty=0.42,
    timing=pb.Timing(queue_ms=0.5, ttft_ms=12.0, total_ms=80.0),
    num_retries=1,
)


def test_build_request() -> None:
    request = build_request(
        [{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0.0,
        exit=16,
        tier="edge",
        node="edge-0",
        handoff_mode="tokens",
        escalation={"force_after_tokens": 2},
        seed=7,
        stop=["\n"],
        enable_thinking=True,
        request_id="r",
    )
    assert request.conversation.messages[0].content == "hi"
    assert request.sampling.max_tokens == 5 and request.sampling.HasField("temperature")
    assert (request.overrides.exit, request.overrides.tier) == (16, pb.TIER_EDGE)
    assert request.overrides.handoff_mode == pb.HANDOFF_MODE_TOKENS
    assert request.escalation.force_after_tokens == 2 and request.enable_thinking
    assert build_request(token_ids=[1, 2]).token_ids.ids == [1, 2]
    for bad in ({"tier": "fog"}, {"handoff_mode": "carrier"}, {"escalation": {"x": 1}}):
        with pytest.raises(ValueError):
            build_request("hi", **bad)
    with pytest.raises(ValueError):
        build_request("hi", token_ids=[1])


def test_format_trace() -> None:
    text = format_trace(TRACE)
    assert "difficulty 0.42, 10 tokens, 2 handoff(s), 1 retry" in text
    assert "edge-0@12 -> edge-0@16 (low_confidence): branch switch" in text
    assert "edge-0@16 -> cloud-0@20 (forced): hidden, 2.4 MiB, 3.2 ms, pushed" in text
    assert "cloud-0      cloud exit 20   5 tokens" in text
    assert "queue 0.5 ms, first token 12.0 ms, total 80.0 ms" in text


def test_trace_to_dict_is_json() -> None:
    data = json.loads(json.dumps(trace_to_dict(TRACE)))
    assert data["spans"][2] == {"node": "cloud-0", "tier": "cloud", "exit": 20, "num_tokens": 5}
    assert data["handoffs"][1]["mode"] == "hidden" and data["handoffs"][1]["pushed"] is True
    assert data["handoffs"][0]["mode"] == "unspecified"
    assert data["timing"]["ttft_ms"] == 12.0 and data["num_retries"] == 1


class GappyRouter(pb_grpc.RouterServicer):
    def Generate(self, request, context):  # noqa: N802
        yield pb.Chunk(token_ids=[1, 2], token_offset=0)
        yield pb.Chunk(token_ids=[3], token_offset=int(request.text))
        yield pb.Chunk(token_offset=3, finish_reason=pb.FINISH_REASON_STOP, trace=TRACE)


def test_complete_checks_offsets() -> None:
    served = serve_grpc([(pb_grpc.add_RouterServicer_to_server, GappyRouter())], "127.0.0.1:0", [])
    try:
        with RouterClient(f"127.0.0.1:{served.port}", timeout=5) as client:
            done = client.complete("2", raw=True)
            assert done.token_ids == [1, 2, 3] and done.finish_reason == "stop"
            assert done.as_dict()["trace"]["difficulty"] == 0.42
            with pytest.raises(StreamGapError, match="expected 2"):
                client.complete("3", raw=True)
    finally:
        served.stop(0)
