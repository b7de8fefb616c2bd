"""Router routing against fake nodes: score → tier/exit, overrides, bad input, Route, ListNodes."""

from __future__ import annotations

import grpc
import pytest

from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.requests import MAX_PROMPT_BYTES, MAX_PROMPT_TOKEN_IDS
from tests.router.cluster import EASY_PROMPT, HARD_PROMPT


def test_easy_prompt_goes_to_edge_and_hard_to_cloud(cluster) -> None:
    easy = cluster.client.complete(EASY_PROMPT, max_tokens=4)
    assert easy.token_ids == [100, 101, 102, 103]
    assert easy.text == "t100 t101 t102 t103 "
    assert easy.finish_reason == "length"
    assert [(s.tier, s.exit) for s in easy.trace.spans] == [(pb.TIER_EDGE, 12)]
    assert easy.trace.difficulty == pytest.approx(0.0)
    assert {s.node for s in easy.sources} <= {"edge-0", "edge-1"}
    hard = cluster.client.complete(HARD_PROMPT, max_tokens=4)
    span = hard.trace.spans[0]
    assert (span.node, span.tier, span.exit, span.num_tokens) == ("cloud-0", pb.TIER_CLOUD, 29, 4)
    assert hard.trace.difficulty > 0.8
    assert not hard.trace.handoffs and hard.trace.num_retries == 0
    timing = hard.trace.timing
    assert 0 < timing.queue_ms <= timing.ttft_ms <= timing.total_ms


def test_node_request_carries_exit_escalation_and_request_id(cluster) -> None:
    chunks = list(cluster.client.generate(HARD_PROMPT, max_tokens=2, request_id="req-1"))
    assert {c.request_id for c in chunks} == {"req-1"}
    sent = cluster.nodes["cloud-0"].generate_requests[-1]
    assert sent.request_id == "req-1" and sent.overrides.exit == 29
    assert sent.escalation.enabled and sent.escalation.window == 4
    assert sent.escalation.threshold == pytest.approx(0.3)
    assert not sent.prefix_token_ids


def test_router_assigns_request_ids(cluster) -> None:
    chunks = list(cluster.client.generate(EASY_PROMPT, max_tokens=2))
    (request_id,) = {c.request_id for c in chunks}
    assert len(request_id) == 32
    sent = [r for n in cluster.nodes.values() for r in n.generate_requests]
    assert [r.request_id for r in sent] == [request_id]


def test_client_escalation_fields_win(cluster) -> None:
    cluster.client.complete(HARD_PROMPT, max_tokens=2, escalation={"window": 9, "enabled": False})
    sent = cluster.nodes["cloud-0"].generate_requests[-1].escalation
    assert (sent.enabled, sent.window) == (False, 9)
    assert sent.threshold == pytest.approx(0.3)  # unset by the client: from topology.yaml


@pytest.mark.parametrize(
    ("overrides", "node", "exit_"),
    [
        ({"exit": 24}, "cloud-0", 24),
        ({"tier": "cloud"}, "cloud-0", 20),  # cloud's exit closest to the easy prompt's 12
        ({"node": "edge-1"}, "edge-1", 12),
        ({"node": "edge-1", "exit": 16}, "edge-1", 16),
    ],
)
def test_overrides(cluster, overrides, node, exit_) -> None:
    done = cluster.client.complete(EASY_PROMPT, max_tokens=2, **overrides)
    assert [(s.node, s.exit) for s in done.trace.spans] == [(node, exit_)]
    assert cluster.nodes[node].generate_requests[-1].overrides.exit == exit_


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exit": 13}, "unknown exit 13"),
        ({"node": "edge-9"}, "unknown node 'edge-9'"),
        ({"node": "edge-0", "exit": 29}, "does not serve exit 29"),
        ({"tier": "edge", "exit": 29}, "not served on tier 'edge'"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"escalation": {"threshold": 1.5}}, "escalation.threshold"),
        ({"escalation": {"force_to_exit": 7}}, "force_to_exit 7"),
    ],
)
def test_bad_requests_are_invalid_argument(cluster, kwargs, message) -> None:
    with pytest.raises(grpc.RpcError) as info:
        cluster.client.complete(EASY_PROMPT, **kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert cluster.client.complete(EASY_PROMPT, max_tokens=1).token_ids == [100]  # still serving


def raw_call(cluster, request: pb.GenerateRequest) -> grpc.RpcError:
    stub_call = cluster.client._stub.Generate(request, timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        list(stub_call)
    return info.value


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.GenerateRequest(), "no prompt"),
        (pb.GenerateRequest(text="   "), "empty prompt"),
        (pb.GenerateRequest(conversation=pb.Conversation()), "empty prompt"),
        (pb.GenerateRequest(token_ids=pb.TokenIds()), "empty prompt"),
        (pb.GenerateRequest(text="x" * (MAX_PROMPT_BYTES + 1)), "prompt too long"),
        (
            pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * (MAX_PROMPT_TOKEN_IDS + 1))),
            "prompt too long",
        ),
        (pb.GenerateRequest(text="hi", prefix_token_ids=[1]), "prefix_token_ids"),
        (
            pb.GenerateRequest(text="hi", overrides=pb.Overrides(tier=7)),
            "unknown tier 7",
        ),
        (
            pb.GenerateRequest(text="hi", overrides=pb.Overrides(handoff_mode=9)),
            "unknown handoff mode 9",
        ),
    ],
)
def test_bad_prompts_are_invalid_argument(cluster, request_, message) -> None:
    error = raw_call(cluster, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()
    assert not any(node.generate_requests for node in cluster.nodes.values())


def test_token_id_and_conversation_prompts(cluster) -> None:
    done = cluster.client.complete(token_ids=[5, 6, 7], max_tokens=3)
    assert done.token_ids == [100, 101, 102] and done.trace.spans[0].exit == 12
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert cluster.client.complete(messages, max_tokens=1).trace.spans[0].tier == pb.TIER_EDGE


def test_route_is_a_dry_run(cluster) -> None:
    reply = cluster.client.route(HARD_PROMPT)
    assert (reply.tier, reply.exit, reply.node) == (pb.TIER_CLOUD, 29, "cloud-0")
    assert reply.node_address == cluster.topology.node("cloud-0").listen
    assert reply.difficulty > 0.8
    assert not cluster.nodes["cloud-0"].generate_requests
    with pytest.raises(grpc.RpcError) as info:
        cluster.client.route(EASY_PROMPT, exit=99)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_nodes(cluster) -> None:
    nodes = cluster.client.list_nodes()
    assert [n.name for n in nodes] == ["edge-0", "edge-1", "cloud-0"]
    assert all(n.healthy and n.HasField("last_seen_ms_ago") for n in nodes)
    assert list(nodes[2].info.exits) == [20, 24, 29]
    assert nodes[0].address == cluster.topology.node("edge-0").listen


def test_no_healthy_node_is_unavailable(cluster) -> None:
    cluster.nodes["cloud-0"].stop()
    cluster.registry.mark_failed("cloud-0")
    with pytest.raises(grpc.RpcError) as info:
        cluster.client.complete(HARD_PROMPT, max_tokens=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no healthy node serves exit 29" in info.value.details()
    assert cluster.client.complete(EASY_PROMPT, max_tokens=1).token_ids == [100]
