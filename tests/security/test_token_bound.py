"""A node's queue is bounded by tokens as well as by streams (`max_queued_tokens`: prompt +
max_tokens summed over the streams it holds), tried against real daemons: past the bound the
node answers RESOURCE_EXHAUSTED while it still takes a request that fits, and the router
starts a refused request on a node serving a deeper exit; once the big stream ends, the node
takes it again."""

from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest

from ruyiflow.cluster.errors import RetryLater, TopologyError
from ruyiflow.cluster.grpc_server import Admission
from ruyiflow.cluster.topology_yaml import load_topology
from ruyiflow.local_cluster import TOPOLOGY, start_local_cluster, write_topology
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.client import RouterClient

BOUND = 1600
PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690]
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14,"  # a greedy model goes on counting


# edge-0 only (the cloud node's context is 4096)
TEMPLATE = TOPOLOGY.replace(
    "    max_context: 2048\n", f"    max_context: 2048\n    max_queued_tokens: {BOUND}\n"
)


def test_the_token_budget_is_shared_by_the_calls_in():
    admission = Admission("node n", max_in_flight=8, max_tokens=100)
    with admission.hold_tokens(60), admission.hold_tokens(40):
        assert admission.num_tokens == 100
        with pytest.raises(RetryLater, match="100 of 100 tokens held; this request needs 1"):
            with admission.hold_tokens(1):
                pass
    assert admission.num_tokens == 0
    with admission.hold_tokens(500):  # alone: taken (the context length bounds it)
        with pytest.raises(RetryLater):
            with admission.hold_tokens(1):
                pass
    unbounded = Admission("node n")
    with unbounded.hold_tokens(10**9), unbounded.hold_tokens(10**9):
        pass


def test_max_queued_tokens_is_read_per_node(tmp_path):
    write_topology(tmp_path / "t.yaml", TEMPLATE)
    topology = load_topology(tmp_path / "t.yaml")
    assert topology.node("edge-0").max_queued_tokens == BOUND
    assert topology.node("cloud-0").max_queued_tokens == 0  # no bound
    (tmp_path / "bad.yaml").write_text(
        (tmp_path / "t.yaml").read_text().replace(f"tokens: {BOUND}", "tokens: -1")
    )
    with pytest.raises(TopologyError, match="max_queued_tokens: must be >= 0"):
        load_topology(tmp_path / "bad.yaml")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_local_cluster(tmp_path_factory.mktemp("token-bound"), template=TEMPLATE)
    yield c
    c.stop(grace=5)


def node_request(max_tokens: int, **prompt: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=uuid.uuid4().hex,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        overrides=pb.Overrides(exit=12),
        **prompt,  # type: ignore[arg-type]
    )


# ~50 s; the budget is tested above, the router moving a node's refusal deeper in
# tests/router/test_router_failover.py
@pytest.mark.slow
def test_a_node_full_of_tokens_refuses_and_the_router_goes_deeper(cluster):
    # Loopback callers are the cluster's own (no TLS, no secret needed here).
    channel = grpc.insecure_channel(cluster.addr["edge"])
    stub = pb_grpc.NodeStub(channel)
    # A holds its prompt + 1500 tokens of edge-0's 1600 while it streams.
    big = stub.Generate(node_request(1500, text=COUNTING), timeout=300)
    first = threading.Event()
    received: list[int] = []

    def consume() -> None:
        try:
            for chunk in big:
                received.extend(chunk.token_ids)
                first.set()
        except grpc.RpcError:
            pass  # cancelled below
        first.set()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        assert first.wait(120) and received, "the big stream did not start"
        # 10 + 100 more tokens do not fit: RESOURCE_EXHAUSTED from the node, saying why.
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(node_request(100, token_ids=pb.TokenIds(ids=PROMPT)), timeout=60))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"of {BOUND} tokens held" in err.value.details()
        # 10 + 20 fit beside it: the bound is in tokens, not in streams.
        small = stub.Generate(node_request(20, token_ids=pb.TokenIds(ids=PROMPT)), timeout=60)
        assert sum(len(c.token_ids) for c in small) >= 1
        # Through the router: planned for exit 12, refused by edge-0, started deeper on cloud-0.
        with RouterClient(cluster.addr["router"], timeout=120) as client:
            done = client.complete("Hi there!", max_tokens=100, temperature=0.0)
        assert done.sources[0].node == "cloud-0" and done.sources[0].exit > 12
        assert done.trace.deeper_for_load_from == 12
        assert reader.is_alive(), "the big stream ended early: the test proved nothing"
    finally:
        big.cancel()
        reader.join(timeout=30)
    # The cancelled stream's tokens are given back (once its handler sees the cancel).
    deadline = time.monotonic() + 30
    while True:
        try:
            list(stub.Generate(node_request(100, token_ids=pb.TokenIds(ids=PROMPT)), timeout=60))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the cancelled stream's tokens stayed held"
            time.sleep(0.2)
    channel.close()
    # edge-0 takes the router's request at its planned exit again.
    with RouterClient(cluster.addr["router"], timeout=120) as client:
        done = client.complete("Hi there!", max_tokens=100, temperature=0.0)
    assert (done.sources[0].node, done.sources[0].exit) == ("edge-0", 12)
