"""Node addresses given as DNS names: the registry resolves them itself, moves a node's channel
when its pod moves, balances over every address of a node pool, and looks a name up again
right after a stream to it failed."""

from __future__ import annotations

import dataclasses
import time

import grpc
import pytest

from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.node_dns import channel_target, dns_host
from ruyiflow.router.registry import NodeRegistry
from tests.router.cluster import DEFAULT_NODES, free_port, make_topology
from tests.router.fake_node import FakeNode


class FakeDns:
    """A resolver whose answers the test sets (and which counts lookups)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.num_lookups = 0

    def __call__(self, host: str, port: int) -> list[str]:
        self.num_lookups += 1
        return list(self.answers.get(host, []))


@pytest.fixture
def pool():
    """edge-0 is `pool.test:PORT`; fake nodes listen on that port at 127.0.0.1 and 127.0.0.2."""
    port = free_port()
    members = {}
    for ip in ("127.0.0.1", "127.0.0.2"):
        members[ip] = FakeNode("edge-0", "edge", (12, 16))
        members[ip].start(f"{ip}:{port}")
    others = {f"{n}.listen": free_port() for n in ("edge-1", "cloud-0")}
    topology = make_topology(DEFAULT_NODES, {"edge-0.listen": port, **others})
    nodes = tuple(
        dataclasses.replace(n, listen=f"pool.test:{port}") if n.name == "edge-0" else n
        for n in topology.nodes
    )
    dns = FakeDns()
    yield dataclasses.replace(topology, nodes=nodes), members, dns
    for member in members.values():
        member.stop()


def generate(registry: NodeRegistry) -> None:
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[1, 2]), sampling=pb.SamplingParams(max_tokens=1)
    )
    list(registry.stub("edge-0").Generate(request, timeout=5))


def test_targets_for_names_and_literals():
    assert dns_host("10.0.0.5:7701") is None and dns_host("[::1]:7701") is None
    assert dns_host("edge-0.edge.ruyiflow.svc:7701") == ("edge-0.edge.ruyiflow.svc", 7701)
    target, options = channel_target("pool:7701", ["10.0.0.2", "10.0.0.1", "fd00::1"])
    assert target == "ipv4:10.0.0.2:7701,10.0.0.1:7701"
    assert options == [("grpc.lb_policy_name", "round_robin")]
    assert channel_target("pool:7701", []) == ("pool:7701", [])  # gRPC's resolver tries
    assert channel_target("10.0.0.5:7701", ["10.0.0.9"]) == ("10.0.0.5:7701", [])


def test_a_pod_that_moves_is_followed(pool):
    topology, members, dns = pool
    dns.answers["pool.test"] = ["127.0.0.1"]
    registry = NodeRegistry(topology, poll_interval_s=0.05, rpc_timeout_s=0.5, resolver=dns)
    try:
        registry.poll_once()
        assert registry.is_available("edge-0")
        generate(registry)
        members["127.0.0.1"].stop()  # the pod goes; its replacement has another address
        dns.answers["pool.test"] = ["127.0.0.2"]
        assert registry.resolve_names() == ["edge-0"]
        registry.poll_once()
        assert registry.is_available("edge-0")
        generate(registry)
        assert len(members["127.0.0.2"].generate_requests) == 1
        assert registry.resolve_names() == []  # same answer: the channel stays
    finally:
        registry.close()


def test_a_node_pool_behind_one_name_is_balanced(pool):
    topology, members, dns = pool
    dns.answers["pool.test"] = ["127.0.0.1", "127.0.0.2"]
    registry = NodeRegistry(topology, poll_interval_s=0.05, rpc_timeout_s=0.5, resolver=dns)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            m.generate_requests for m in members.values()
        ):
            try:
                generate(registry)
            except grpc.RpcError:
                time.sleep(0.05)  # round_robin still connecting
        assert all(m.generate_requests for m in members.values())
    finally:
        registry.close()


def test_a_failure_makes_the_poller_look_the_name_up_again(pool):
    topology, _, dns = pool
    dns.answers["pool.test"] = ["127.0.0.1"]
    registry = NodeRegistry(
        topology, poll_interval_s=0.05, rpc_timeout_s=0.5, resolver=dns, resolve_interval_s=3600
    ).start()
    try:
        time.sleep(0.3)
        before = dns.num_lookups
        registry.mark_failed("edge-0")
        deadline = time.monotonic() + 5
        while dns.num_lookups == before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dns.num_lookups > before
    finally:
        registry.close()
