"""The findings of the security issue, tried against real daemons (router, edge-0, cloud-0 as
separate processes) by a client that is not the project's own where it matters.

The nodes listen on this machine's non-loopback address with a cluster secret, so a call from
here is an outsider's unless it presents the secret (loopback peers are trusted)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ruyiflow.cluster.access import CLUSTER_SECRET_ENV, Dialer
from ruyiflow.cmd_up import health
from ruyiflow.local_cluster import TOPOLOGY, free_ports, start_local_cluster
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.client import RouterClient

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690]
SECRET = "s3cret-" + uuid.uuid4().hex


def outside_ip() -> str | None:
    """This machine's address on its default route (no packet is sent), if not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        ip = sock.getsockname()[0]
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ip = outside_ip()
    if ip is None:
        pytest.skip("no non-loopback address to listen on")
    template = TOPOLOGY.replace("listen: 127.0.0.1:{edge}", f"listen: {ip}:{{edge}}")
    template = template.replace("listen: 127.0.0.1:{cloud}", f"listen: {ip}:{{cloud}}")
    template = template.replace(
        "  grace_period_s: 5", "  grace_period_s: 5\n  stream_idle_timeout_s: 2"
    )
    old = os.environ.get(CLUSTER_SECRET_ENV)
    os.environ[CLUSTER_SECRET_ENV] = SECRET  # the children inherit it
    try:
        c = start_local_cluster(tmp_path_factory.mktemp("security"), template=template)
    finally:
        if old is None:
            os.environ.pop(CLUSTER_SECRET_ENV)
        else:
            os.environ[CLUSTER_SECRET_ENV] = old
    c.addr["edge"] = c.addr["edge"].replace("127.0.0.1", ip)
    c.addr["cloud"] = c.addr["cloud"].replace("127.0.0.1", ip)
    yield c
    c.stop(grace=5)


def rss_bytes(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024


def node_stub(cluster, name: str = "edge", caller: str = "router") -> pb_grpc.NodeStub:
    """A stub presenting the cluster secret as `caller`."""
    return pb_grpc.NodeStub(Dialer(caller, SECRET.encode()).channel(cluster.addr[name]))


def outsider_stub(cluster, name: str = "edge") -> pb_grpc.NodeStub:
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
        yield pb.ResumeRequest(data=pb.StateBytes(offset=0, data=data))
        yield pb.ResumeRequest(end=pb.StateEnd(total_bytes=len(data), crc32=zlib.crc32(data)))

    return stub.AcceptState.future(parts(), timeout=30)


def test_accept_state_is_bounded_by_bytes_and_count(cluster):
    stub = node_stub(cluster, caller="cloud-0")  # a peer node pushes states
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


def test_outsiders_get_unauthenticated_from_every_node_method(cluster):
    state = pb.StateRef(state_handle="x", mode=pb.HANDOFF_MODE_HIDDEN)
    calls = {
        "Generate": lambda s: list(s.Generate(pb.GenerateRequest(text="hi"), timeout=5)),
        "Info": lambda s: s.Info(pb.InfoRequest(), timeout=5),
        "Drain": lambda s: s.Drain(pb.DrainRequest(), timeout=5),
        "FetchState": lambda s: list(s.FetchState(state, timeout=5)),
        "PushState": lambda s: s.PushState(pb.PushStateRequest(state=state), timeout=5),
        "AcceptState": lambda s: s.AcceptState(iter([pb.ResumeRequest()]), timeout=5),
        "Resume": lambda s: list(s.Resume(iter([pb.ResumeRequest()]), timeout=5)),
    }
    wrong = pb_grpc.NodeStub(Dialer("router", b"wrong-secret").channel(cluster.addr["cloud"]))
    for stub in (outsider_stub(cluster, "edge"), outsider_stub(cluster, "cloud"), wrong):
        for method, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call(stub)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
    with grpc.insecure_channel(cluster.addr["edge"]) as channel:  # health stays open
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:  # a member name the topology lacks
        node_stub(cluster, caller="mallory").Info(pb.InfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_router_moves_requests_between_nodes_with_the_secret(cluster):
    with RouterClient(cluster.addr["router"], timeout=120) as client:
        done = client.complete(
            "Hi there!",
            max_tokens=8,
            exit=12,
            escalation={"force_after_tokens": 3, "force_to_exit": 20},
        )
    assert len(done.token_ids) == 8
    assert [h.to_exit for h in done.trace.handoffs] == [20]  # pushed edge-0 -> cloud-0


def test_prefix_only_from_the_router(cluster):
    request = pb.GenerateRequest(
        request_id="p",
        token_ids=pb.TokenIds(ids=PROMPT),
        prefix_token_ids=[28, 1690],
        sampling=pb.SamplingParams(max_tokens=4),
        overrides=pb.Overrides(exit=12),
    )
    with pytest.raises(grpc.RpcError) as err:
        list(node_stub(cluster, caller="cloud-0").Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    chunks = list(node_stub(cluster, caller="router").Generate(request, timeout=60))
    assert chunks[0].token_offset == 2


def test_push_goes_only_to_topology_nodes(cluster):
    with socket.socket() as trap:  # a port nobody should be made to dial
        trap.bind(("127.0.0.1", 0))
        trap.listen(1)
        trap.settimeout(1.0)
        request = pb.PushStateRequest(
            state=pb.StateRef(state_handle="x", mode=pb.HANDOFF_MODE_HIDDEN),
            destination=f"127.0.0.1:{trap.getsockname()[1]}",
            transfer_id="t",
        )
        with pytest.raises(grpc.RpcError) as err:
            node_stub(cluster).PushState(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(TimeoutError):
            trap.accept()
    with pytest.raises(grpc.RpcError) as err:  # moving states is the router's
        node_stub(cluster, caller="cloud-0").PushState(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def drain_cli(cluster, *args: str, secret: str | None = SECRET) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CLUSTER_SECRET_ENV}
    if secret is not None:
        env[CLUSTER_SECRET_ENV] = secret
    argv = [sys.executable, "-m", "ruyiflow", "drain", "--topology", cluster.topology, *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_drain_and_undo_from_the_cli(cluster):
    refused = drain_cli(cluster, "edge-0", secret=None)
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    stub = node_stub(cluster)
    done = drain_cli(cluster, "edge-0")
    assert done.returncode == 0, done.stderr
    try:
        assert stub.Info(pb.InfoRequest(), timeout=5).draining
        with pytest.raises(grpc.RpcError) as err:
            generate(stub)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        undone = drain_cli(cluster, "edge-0", "--undo")
    assert undone.returncode == 0, undone.stderr
    assert not stub.Info(pb.InfoRequest(), timeout=5).draining
    assert len(generate(stub)) == 4
    with RouterClient(cluster.addr["router"], timeout=30) as client:  # the router saw it too
        deadline = time.monotonic() + 10
        while any(n.info.draining or not n.healthy for n in client.list_nodes()):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def burst(cluster, num_requests: int) -> list[str]:
    """Outcomes of `num_requests` easy requests sent at once."""

    def one(_: int) -> str:
        with RouterClient(cluster.addr["router"], timeout=600) as client:
            try:
                done = client.complete("Hi there!", max_tokens=4)
            except grpc.RpcError as exc:
                return exc.code().name
        return "deeper" if done.trace.deeper_for_load_from else "planned"

    with ThreadPoolExecutor(num_requests) as pool:
        return list(pool.map(one, range(num_requests)))


def test_a_burst_goes_deeper_instead_of_failing(cluster):
    """48 easy requests at once: edge-0 (batch 8) takes what it can run soon, the rest start
    deeper on cloud-0; none is refused as UNAVAILABLE while a node that can serve is up."""
    outcomes = burst(cluster, 48)
    assert set(outcomes) <= {"planned", "deeper", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes.count("deeper") > 0 and outcomes.count("planned") > 0


@pytest.mark.slow
def test_300_requests_at_once_are_served_or_told_to_retry(cluster):
    """The issue's overload: 300 at once against two nodes of 40 streams each. Nothing is
    UNAVAILABLE; what finds every node full is RESOURCE_EXHAUSTED (retry later)."""
    outcomes = burst(cluster, 300)
    assert set(outcomes) <= {"planned", "deeper", "RESOURCE_EXHAUSTED"}, outcomes
    assert outcomes.count("planned") + outcomes.count("deeper") >= 80  # both nodes filled


def test_a_stopped_node_is_failed_over_and_new_requests_go_deeper(cluster):
    pid = cluster.children["edge-0"].pid
    client = RouterClient(cluster.addr["router"], timeout=120)
    chunks, stopped_at = [], None
    try:
        for chunk in client.generate("Hi there!", max_tokens=24):
            chunks.append(chunk)
            if stopped_at is None and sum(len(c.token_ids) for c in chunks) >= 2:
                assert chunk.source.node == "edge-0"
                os.kill(pid, signal.SIGSTOP)  # hung: the process holds its sockets, silent
                stopped_at = time.monotonic()
        resumed_s = time.monotonic() - stopped_at
        tokens = [t for c in chunks for t in c.token_ids]
        assert len(tokens) == 24
        assert [c.token_offset for c in chunks if c.token_ids] == list(range(24))
        trace = chunks[-1].trace
        assert trace.num_retries == 1 and trace.spans[-1].node == "cloud-0"
        assert resumed_s < 2 + 15  # the idle timeout, then the rest on cloud-0
        time.sleep(2.0)  # failed health checks in a row take edge-0 down
        started = time.monotonic()
        done = client.complete("Hi there!", max_tokens=4)
        assert time.monotonic() - started < 10  # it never waited on the stopped node
        assert done.sources[0].node == "cloud-0" and done.trace.deeper_for_load_from == 12
    finally:
        os.kill(pid, signal.SIGCONT)
        client.close()
    with RouterClient(cluster.addr["router"], timeout=30) as client:
        wait = time.monotonic() + 30
        while not all(n.healthy for n in client.list_nodes()):
            assert time.monotonic() < wait, "edge-0 did not come back"
            time.sleep(0.2)


def test_a_client_stream_survives_a_router_killed_mid_stream(cluster, tmp_path, monkeypatch):
    """A second router of the same topology (they share the key through the cluster secret);
    the first is SIGKILLed mid-stream: the client resumes on the second, and the greedy answer
    is the same as an undisturbed run's."""
    listen, metrics = (f"127.0.0.1:{p}" for p in free_ports(2))
    argv = [sys.executable, "-m", "ruyiflow", "router", "--topology", cluster.topology]
    argv += ["--listen", listen, "--metrics", metrics, "--http", ""]
    env = {**os.environ, CLUSTER_SECRET_ENV: SECRET}
    log = open(tmp_path / "router-2.log", "wb")  # noqa: SIM115
    second = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        with RouterClient(listen, timeout=120) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if all(n.healthy for n in client.list_nodes()):
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the second router did not come up"
                time.sleep(0.2)
            options = {"max_tokens": 24, "temperature": 0.0, "exit": 20}
            reference = client.complete("Tell me about lighthouses.", **options).token_ids
        first = cluster.children["router"]
        ids = []
        with RouterClient([cluster.addr["router"], listen], timeout=120) as client:
            for chunk in client.generate("Tell me about lighthouses.", **options):
                assert chunk.token_offset == len(ids)
                ids.extend(chunk.token_ids)
                if len(ids) >= 5 and first.poll() is None:
                    first.send_signal(signal.SIGKILL)
            assert client.address == listen
        assert first.poll() is not None and ids == reference
    finally:
        second.terminate()
        second.wait(timeout=30)
        log.close()
    monkeypatch.setenv(CLUSTER_SECRET_ENV, SECRET)  # what the restarted router inherits
    deadline = time.monotonic() + 60  # `up`'s supervisor brings the first router back
    while health(cluster.addr["router"]) != "SERVING":
        cluster.supervise()
        assert time.monotonic() < deadline, "the first router was not restarted"
        time.sleep(0.2)
