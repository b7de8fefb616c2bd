"""A node killed with SIGKILL mid-stream: the router resumes the request elsewhere from the
tokens already relayed; the client sees every token exactly once."""

from __future__ import annotations

import signal
import time

import pytest

from ruyiflow.router.client import RouterClient
from tests.cluster.conftest import start_cluster


@pytest.fixture()
def fresh_cluster(tmp_path):
    c = start_cluster(tmp_path)
    yield c
    c.stop(grace=5)


def test_sigkill_mid_stream_loses_and_repeats_nothing(fresh_cluster):
    victim = fresh_cluster.children["cloud-0"]
    with RouterClient(fresh_cluster.addr["router"]) as client:
        chunks, killed = [], False
        for chunk in client.generate(
            "Write a long story about a lighthouse keeper.", max_tokens=40, exit=29
        ):
            chunks.append(chunk)
            if not killed and sum(len(c.token_ids) for c in chunks) >= 6:
                victim.send_signal(signal.SIGKILL)
                killed = True
    assert killed
    offsets = [c.token_offset for c in chunks if c.token_ids]
    counts = [len(c.token_ids) for c in chunks if c.token_ids]
    expected = 0
    for off, n in zip(offsets, counts, strict=True):
        assert off == expected  # no gap, no repeat
        expected += n
    assert expected == 40
    trace = chunks[-1].trace
    assert trace.num_retries >= 1
    assert [s.node for s in trace.spans][0] == "cloud-0" and trace.spans[-1].node == "edge-0"


def test_sigterm_drains_in_flight_and_refuses_new(tmp_path):
    import grpc

    from ruyiflow.proto import ruyiflow_pb2 as pb
    from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc

    c = start_cluster(tmp_path, only=("edge-0",))
    try:
        with grpc.insecure_channel(c.addr["edge"]) as channel:
            stub = pb_grpc.NodeStub(channel)
            req = pb.GenerateRequest(
                request_id="d",
                token_ids=pb.TokenIds(ids=[1, 2, 3]),
                sampling=pb.SamplingParams(max_tokens=60),
                overrides=pb.Overrides(exit=12),
            )
            stream = stub.Generate(req)
            first = next(stream)
            c.children["edge-0"].send_signal(signal.SIGTERM)
            time.sleep(0.6)  # the daemon notices the signal within 0.5 s
            with pytest.raises(grpc.RpcError) as err:  # new streams are refused while draining
                list(stub.Generate(req))
            assert (
                err.value.code() == grpc.StatusCode.UNAVAILABLE
                and "draining" in err.value.details()
            )
            rest = list(stream)  # the in-flight stream finishes within the grace period
            assert len(first.token_ids) + sum(len(x.token_ids) for x in rest) == 60
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert c.children["edge-0"].wait(timeout=30) == 0
    finally:
        c.stop(grace=2)
