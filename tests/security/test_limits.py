"""Limits and statuses seen from outside: garbage bytes, oversized fields and unknown roles are
INVALID_ARGUMENT before any work; pushed states are bounded by count and bytes and swept."""

from __future__ import annotations

import time

import grpc
import pytest

from ruyiflow.cluster.errors import InvalidRequest, Overloaded
from ruyiflow.node.accepted import AcceptedStates
from ruyiflow.proto import ruyiflow_pb2 as pb

CORRUPT = b"\xff\xff\xff\xff\xff"  # not protobuf wire format at all


def bad_utf8(message: object) -> bytes:
    """`message` (its string field set to "AB") with that string made invalid UTF-8."""
    return message.SerializeToString().replace(b"AB", b"\xff\xfe")  # type: ignore[attr-defined]


GENERATE = bad_utf8(pb.GenerateRequest(request_id="AB", text="hi"))
ROUTER_METHODS = {"Generate": GENERATE, "Route": GENERATE, "ListNodes": None}
NODE_METHODS = {
    "Generate": GENERATE,
    "Info": None,
    "Drain": None,
    "PushState": bad_utf8(pb.PushStateRequest(destination="AB")),
    "FetchState": bad_utf8(pb.StateRef(state_handle="AB")),
}


def raw_call(channel: grpc.Channel, method: str, payload: bytes, streaming: bool) -> None:
    """Send `payload` as the request bytes of `method`, bypassing any serializer."""
    if streaming:
        call = channel.unary_stream(method)(payload, timeout=5)
        list(call)
    else:
        channel.unary_unary(method)(payload, timeout=5)


def test_garbage_bytes_are_invalid_argument_on_router_and_node(cluster):
    """A raw client (no generated stubs) sends undecodable bytes to every method."""
    targets = [(cluster.address, "Router", m, b) for m, b in ROUTER_METHODS.items()]
    node_address = f"127.0.0.1:{cluster.nodes['edge-0'].server.port}"
    targets += [(node_address, "Node", m, b) for m, b in NODE_METHODS.items()]
    streaming = {"Generate", "FetchState"}
    for address, service, method, utf8 in targets:
        with grpc.insecure_channel(address) as channel:
            for payload in [CORRUPT] + ([utf8] if utf8 else []):
                with pytest.raises(grpc.RpcError) as err:
                    raw_call(
                        channel, f"/ruyiflow.v1.{service}/{method}", payload, method in streaming
                    )
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (service, method)
                assert "does not decode" in err.value.details()
    # A client-streaming method: the bad message is refused as it is read.
    with grpc.insecure_channel(node_address) as channel:
        call = channel.stream_unary("/ruyiflow.v1.Node/AcceptState")
        with pytest.raises(grpc.RpcError) as err:
            call(iter([CORRUPT]), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert cluster.client.complete("Hi there!", max_tokens=3).token_ids == [100, 101, 102]


def test_roles_come_from_a_fixed_set(cluster):
    for role in ("hacker", "", "x" * 100):
        with pytest.raises(grpc.RpcError) as err:
            cluster.client.complete([{"role": role, "content": "hi"}], max_tokens=2)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "role" in err.value.details()
    done = cluster.client.complete(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=2,
    )
    assert len(done.token_ids) == 2


def test_whole_request_size_counts_every_field(cluster):
    """A 4 MB role (or stop list, or request id) is refused by size before anything else."""
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        cluster.client.complete([{"role": "u" * (4 << 20), "content": "hi"}], max_tokens=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request too large" in err.value.details()
    assert time.perf_counter() - started < 2.0
    assert not any(n.generate_requests for n in cluster.nodes.values())


def test_accepted_states_bounded_by_count_and_bytes():
    store = AcceptedStates(max_states=2, max_bytes=100)
    store.reserve("a", 40, "edge-0")
    with pytest.raises(Overloaded, match="pushed states"):
        store.reserve("b", 61, "edge-0")  # 101 bytes in all
    store.reserve("b", 60, "edge-0")
    with pytest.raises(Overloaded):
        store.reserve("c", 0, "edge-0")  # a third state
    with pytest.raises(InvalidRequest, match="already in use"):
        store.reserve("a", 1, "edge-0")
    store.release("b")
    store.reserve("c", 10, "edge-0")
    with pytest.raises(InvalidRequest, match="no pushed state"):
        store.take("c")  # reserved, bytes not arrived yet
    store.fill("c", pb.HandoffHeader(transfer_id="c"), b"x" * 10)
    header, data = store.take("c")
    assert header.transfer_id == "c" and data == b"x" * 10
    with pytest.raises(InvalidRequest):
        store.take("c")  # taken once


def test_accepted_states_expire_on_a_timer():
    now = [0.0]
    store = AcceptedStates(max_states=4, max_bytes=1000, ttl_s=10, clock=lambda: now[0])
    store.reserve("a", 100, "edge-0")
    store.fill("a", pb.HandoffHeader(transfer_id="a"), b"y" * 100)
    now[0] = 11.0
    store.start_sweeper(interval_s=0.01)
    try:
        deadline = time.monotonic() + 5
        while store.num_states and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.num_states == 0 and store.num_bytes == 0  # no push needed to sweep
    finally:
        store.stop()
