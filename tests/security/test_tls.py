"""mTLS with real daemons on loopback: the topology's `tls:` block and `ruyiflow certs`; every
daemon talks mTLS (router -> nodes, node -> node pushes), the OpenAI API and /metrics are
HTTPS, and strangers are turned away: a plaintext channel, a channel without a client
certificate, a certificate of another CA, a cluster certificate naming no process of the
topology, and a topology identity calling a method that is not its own."""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest

from ruyiflow.cluster.access import Dialer
from ruyiflow.cluster.tls import TlsFiles, tls_files, warn_if_exposed
from ruyiflow.cluster.topology_yaml import load_topology
from ruyiflow.cmd_certs import _load_or_make_ca, issue, make_certs
from ruyiflow.cmd_up import Cluster
from ruyiflow.local_cluster import TOPOLOGY, write_topology
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.client import RouterClient

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690]


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    path = root / "topology.yaml"
    ports = write_topology(path, TOPOLOGY + "tls: {{dir: certs, require_client_cert: true}}\n")
    make_certs(path, root / "certs")
    cluster = Cluster(str(path), log_dir=root / "logs")
    cluster.start()
    try:
        cluster.wait_healthy(timeout=300, progress=False)
    except Exception:
        cluster.stop(grace=2)
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in root.glob("logs/*"))
        raise RuntimeError(f"cluster did not start:\n{logs}") from None
    cluster.addr = {k: f"127.0.0.1:{v}" for k, v in ports.items()}
    cluster.topology = load_topology(path)
    cluster.root = root
    yield cluster
    cluster.stop(grace=5)


def node_stub(secure, name: str, files: TlsFiles | None, node: str = "edge-0"):
    key = "edge" if node == "edge-0" else "cloud"
    if files is None:
        channel = grpc.insecure_channel(secure.addr[key])
    else:
        channel = Dialer(name, None, files).channel(secure.addr[key], peer=node)
    return pb_grpc.NodeStub(channel)


def test_router_nodes_and_pushes_run_over_mtls(secure):
    operator = tls_files(secure.topology, "operator")
    with RouterClient(secure.addr["router"], timeout=120, tls=operator) as client:
        done = client.complete(
            "Hi there!",
            max_tokens=8,
            exit=12,
            escalation={"force_after_tokens": 3, "force_to_exit": 20},
        )
    assert len(done.token_ids) == 8
    (move,) = done.trace.handoffs  # edge-0 pushed its state to cloud-0 over mTLS
    assert (move.from_node, move.to_node, move.pushed) == ("edge-0", "cloud-0", True)


def test_strangers_are_turned_away(secure, tmp_path):
    ca = secure.root / "certs" / "ca.pem"
    no_cert = grpc.secure_channel(
        secure.addr["edge"],
        grpc.ssl_channel_credentials(root_certificates=ca.read_bytes()),
        options=[("grpc.ssl_target_name_override", "edge-0")],
    )
    other_ca = tmp_path / "other"
    make_certs(secure.root / "topology.yaml", other_ca)  # same names, another CA
    foreign = TlsFiles(ca, *(other_ca / "router.pem", other_ca / "router-key.pem"))
    stubs = {
        "plaintext": node_stub(secure, "router", None),
        "no client certificate": pb_grpc.NodeStub(no_cert),
        "another CA": node_stub(secure, "router", foreign),
    }
    for what, stub in stubs.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.Info(pb.InfoRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what
    with pytest.raises(grpc.RpcError) as err:  # the router's gRPC asks for certificates too
        RouterClient(secure.addr["router"], timeout=5).list_nodes()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_only_topology_identities_and_their_methods(secure):
    certs = secure.root / "certs"
    ca_cert, ca_key = _load_or_make_ca(certs, 1)
    issue(certs, "mallory", [], ca_cert, ca_key, 1)  # the cluster's CA, a name it lacks
    mallory = TlsFiles(certs / "ca.pem", certs / "mallory.pem", certs / "mallory-key.pem")
    with pytest.raises(grpc.RpcError) as err:
        node_stub(secure, "mallory", mallory).Info(pb.InfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    operator = node_stub(secure, "operator", tls_files(secure.topology, "operator"))
    assert operator.Info(pb.InfoRequest(), timeout=5).name == "edge-0"
    state = pb.StateRef(state_handle="x", mode=pb.HANDOFF_MODE_HIDDEN)
    with pytest.raises(grpc.RpcError) as err:  # moving states is the router's
        list(operator.FetchState(state, timeout=5))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    request = pb.GenerateRequest(
        request_id="p",
        token_ids=pb.TokenIds(ids=PROMPT),
        prefix_token_ids=[28],
        sampling=pb.SamplingParams(max_tokens=2),
        overrides=pb.Overrides(exit=12),
    )
    cloud = node_stub(secure, "cloud-0", tls_files(secure.topology, "cloud-0"))
    with pytest.raises(grpc.RpcError) as err:  # a node's certificate is no router's
        list(cloud.Generate(request, timeout=30))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    router = node_stub(secure, "router", tls_files(secure.topology, "router"))
    chunks = list(router.Generate(request, timeout=60))
    assert chunks[0].token_offset == 1 and chunks[0].token_ids  # continues after the prefix


def https(secure, url: str, with_cert: bool) -> int:
    files = tls_files(secure.topology, "operator")
    context = ssl.create_default_context(cafile=str(files.ca))
    context.check_hostname = False  # the certificate names the process; the CA is checked
    if with_cert:
        context.load_cert_chain(str(files.cert), str(files.key))
    with urllib.request.urlopen(url, context=context, timeout=10) as reply:
        return reply.status


def test_openai_api_and_metrics_are_https(secure):
    for url in (
        f"https://{secure.addr['router_http']}/health",
        f"https://{secure.addr['router_m']}/metrics",
        f"https://{secure.addr['edge_m']}/metrics",
    ):
        assert https(secure, url, with_cert=True) == 200
        with pytest.raises(OSError):  # no client certificate: the handshake fails
            https(secure, url, with_cert=False)
        with pytest.raises(OSError):  # plaintext HTTP gets nothing
            urllib.request.urlopen(url.replace("https", "http"), timeout=5)


def test_plaintext_beyond_loopback_is_warned_of(caplog):
    with caplog.at_level(logging.WARNING):
        assert not warn_if_exposed("127.0.0.1:7700", "router.listen")
        assert not warn_if_exposed("[::1]:7700", "router.listen")
        assert not caplog.records
        assert warn_if_exposed("0.0.0.0:7700", "nodes.edge-0.listen")
    assert "nodes.edge-0.listen listens on 0.0.0.0:7700 without TLS" in caplog.text


def test_certs_cli_names_every_process(tmp_path):
    path = tmp_path / "topology.yaml"
    write_topology(path)
    names = make_certs(path, tmp_path / "certs")
    assert sorted(names) == ["cloud-0", "edge-0", "operator", "router"]
    key = Path(tmp_path / "certs" / "edge-0-key.pem")
    assert key.stat().st_mode & 0o777 == 0o600


def test_the_shipped_tls_topology_loads_and_gets_certificates(tmp_path):
    shipped = Path(__file__).resolve().parents[2] / "deploy" / "topology-tls.yaml"
    topology = load_topology(shipped)
    assert topology.tls is not None and topology.tls.require_client_cert
    copy = tmp_path / "topology-tls.yaml"
    copy.write_text(shipped.read_text())
    make_certs(copy, tmp_path / "certs")
    files = tls_files(load_topology(copy), "edge-0")
    assert all(p.is_file() for p in (files.ca, files.cert, files.key))


def cli(secure, *args: str) -> subprocess.CompletedProcess:
    argv = [
        sys.executable,
        "-m",
        "ruyiflow",
        *args,
        "--topology",
        str(secure.root / "topology.yaml"),
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_the_command_line_talks_mtls_as_operator(secure):
    done = cli(secure, "query", "--max-tokens", "2", "--json", "Hi there!")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["token_ids"]) == 2
    drained = cli(secure, "drain", "edge-0")
    assert drained.returncode == 0, drained.stderr
    undone = cli(secure, "drain", "edge-0", "--undo")
    assert undone.returncode == 0, undone.stderr
    operator = node_stub(secure, "operator", tls_files(secure.topology, "operator"))
    assert not operator.Info(pb.InfoRequest(), timeout=5).draining


def test_health_asks_as_operator_over_mtls(secure):
    for name in ("router", "edge-0", "cloud-0"):
        done = cli(secure, "health", name)
        assert (done.returncode, done.stdout.strip()) == (0, f"{name}: SERVING"), done.stderr
    assert cli(secure, "health", "edge-9").returncode == 2
