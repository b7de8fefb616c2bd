"""The findings of the security issue, tried against real daemons on loopback (router, edge-0,
cloud-0 as separate processes) by a client that is not the project's own where it matters."""

from __future__ import annotations

import re
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from ruyiflow.local_cluster import start_local_cluster
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_local_cluster(tmp_path_factory.mktemp("security"))
    yield c
    c.stop(grace=5)


def rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


def node_stub(cluster, name: str = "edge") -> pb_grpc.NodeStub:
    return pb_grpc.NodeStub(grpc.insecure_channel(cluster.addr[name]))


def generate(stub: pb_grpc.NodeStub, exit_layer: int = 12, max_tokens: int = 4) -> list[int]:
    request = pb.GenerateRequest(
        request_id=uuid.uuid4().hex,
        token_ids=pb.TokenIds(ids=PROMPT),
        sampling=pb.SamplingParams(max_tokens=max_tokens),
        overrides=pb.Overrides(exit=exit_layer),
    )
    return [t for c in stub.Generate(request, timeout=60) for t in c.token_ids]


def test_node_refuses_big_and_unknown_roles_before_tokenizing(cluster):
    stub = node_stub(cluster)
    cases = [("u" * (4 << 20), "request too large"), ("hacker", "is not one of")]
    for role, match in cases:
        request = pb.GenerateRequest(request_id="r", overrides=pb.Overrides(exit=12))
        request.conversation.messages.add(role=role, content="hi")
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert match in err.value.details()
        assert time.perf_counter() - started < 2.0  # refused, not tokenized
    assert len(generate(stub)) == 4


def _push(stub, transfer_id: str, total_bytes: int, data: bytes | None, hold: threading.Event):
    """AcceptState with a header announcing `total_bytes`; `data` None: send nothing more
    until `hold` is set (the announced room stays reserved meanwhile)."""
    header = pb.HandoffHeader(
        transfer_id=transfer_id, mode=pb.HANDOFF_MODE_HIDDEN, total_bytes=total_bytes
    )

    def parts():
        yield pb.ResumeRequest(header=header)
        if data is None:
            hold.wait(30)
            return
        import zlib

        yield pb.ResumeRequest(data=pb.StateBytes(offset=0, data=data))
        yield pb.ResumeRequest(end=pb.StateEnd(total_bytes=len(data), crc32=zlib.crc32(data)))

    return stub.AcceptState.future(parts(), timeout=30)


def test_accept_state_is_bounded_by_bytes_and_count(cluster):
    stub = node_stub(cluster)
    pid = cluster.children["edge-0"].pid
    rss_before = rss_bytes(pid)
    with pytest.raises(grpc.RpcError) as err:
        _push(stub, "probe", 1 << 40, b"", threading.Event()).result()
    max_state = int(re.search(r"the limit (\d+)", err.value.details()).group(1))
    hold = threading.Event()
    try:
        # Two largest states reserve all the bytes, before a single state byte was sent.
        held = [_push(stub, f"big-{i}", max_state, None, hold) for i in range(2)]
        time.sleep(1.0)
        with pytest.raises(grpc.RpcError) as err:
            _push(stub, "one-more", 1 << 20, b"x" * (1 << 20), hold).result()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        hold.set()
    for call in held:
        with pytest.raises(grpc.RpcError):  # the holders never completed their state
            call.result()
    # By count: the edge node keeps at most max(4, max_batch=8) states.
    replies = [_push(stub, f"small-{i}", 16, b"s" * 16, hold) for i in range(8)]
    assert all(r.result().num_bytes == 16 for r in replies)
    with pytest.raises(grpc.RpcError) as err:
        _push(stub, "small-9", 16, b"s" * 16, hold).result()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rss_bytes(pid) - rss_before < 64 << 20
    assert len(generate(stub)) == 4  # still serving
