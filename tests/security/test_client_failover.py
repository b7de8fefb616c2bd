"""Router failover for clients: two routers of one topology (sharing the resume key) in front
of fake nodes; the client's router dies mid-stream and the stream goes on on the other with
no token lost or repeated. A resume token is checked: forged or edited resumes are refused."""

from __future__ import annotations

import random
import threading

import grpc
import pytest

from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.client import RouterClient, build_request
from ruyiflow.router.daemon import RouterDaemon
from ruyiflow.router.resume import RESUME_KEY_ENV
from tests.router.cluster import EASY_PROMPT
from tests.security.conftest import FakeCluster


@pytest.fixture
def two_routers(monkeypatch):
    monkeypatch.setenv(RESUME_KEY_ENV, "resume-key-for-the-test")
    first = FakeCluster()
    second = RouterDaemon(
        first.topology,
        listen="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        http_address="",
        poll_interval_s=0.05,
        rng=random.Random(1),
        serve_metrics=False,
    ).start()
    assert second.registry.wait_ready(5)
    yield first, second
    second.stop(grace=0)
    first.close()


def test_a_stream_survives_its_router(two_routers):
    first, second = two_routers
    for node in first.nodes.values():
        node.behaviour.token_delay_s = 0.05
    addresses = [first.address, f"127.0.0.1:{second.port}"]
    ids = []
    with RouterClient(addresses, timeout=30) as client:
        for chunk in client.generate(EASY_PROMPT, max_tokens=20):
            assert chunk.token_offset == len(ids)  # continuous across the routers
            ids.extend(chunk.token_ids)
            if len(ids) == 5:
                threading.Thread(target=first.daemon.stop, args=(0,)).start()  # router 1 dies
        assert client.address == addresses[1]
    assert ids == [100 + k for k in range(20)]
    resumed = [r for n in first.nodes.values() for r in n.generate_requests if r.prefix_token_ids]
    assert resumed and len(resumed[-1].prefix_token_ids) >= 5  # the node got what was sent


def signed_prefix(address: str, max_tokens: int = 6) -> tuple[pb.GenerateRequest, list]:
    request = build_request(EASY_PROMPT, max_tokens=max_tokens)
    with grpc.insecure_channel(address) as channel:
        chunks = list(pb_grpc.RouterStub(channel).Generate(request, timeout=30))
    return request, chunks


def test_resume_tokens_are_checked(two_routers):
    first, second = two_routers
    request, chunks = signed_prefix(first.address)
    assert all(c.resume_token for c in chunks)
    ids = [t for c in chunks[:3] for t in c.token_ids]
    text = "".join(c.text for c in chunks[:3])
    good = pb.ResumeFrom(token_ids=ids, text=text, resume_token=chunks[2].resume_token)
    forged = [
        pb.ResumeFrom(token_ids=ids, text=text, resume_token=b"x" * 32),
        pb.ResumeFrom(token_ids=[*ids[:-1], 7], text=text, resume_token=good.resume_token),
        pb.ResumeFrom(token_ids=ids, text=text + "!", resume_token=good.resume_token),
    ]
    with grpc.insecure_channel(f"127.0.0.1:{second.port}") as channel:
        stub = pb_grpc.RouterStub(channel)
        for resume in forged:
            bad = pb.GenerateRequest()
            bad.CopyFrom(request)
            bad.resume.CopyFrom(resume)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(bad, timeout=30))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        other = build_request(EASY_PROMPT, max_tokens=7)  # the token binds its request
        other.resume.CopyFrom(good)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(other, timeout=30))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        ok = pb.GenerateRequest()
        ok.CopyFrom(request)
        ok.resume.CopyFrom(good)
        rest = list(stub.Generate(ok, timeout=30))
    assert rest[0].token_offset == 3
    assert [t for c in rest for t in c.token_ids] == [100 + k for k in range(3, 6)]
