"""Client API keys on both front ends of a real router (fake nodes behind it): gRPC metadata
`authorization: Bearer ...` and the OpenAI `Authorization` header; UNAUTHENTICATED / 401
otherwise, health left open, keys never in the logs."""

from __future__ import annotations

import dataclasses
import logging
import random
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ruyiflow.cluster.api_keys import ApiKeys
from ruyiflow.cluster.errors import TopologyError, Unauthenticated
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.client import RouterClient
from ruyiflow.router.daemon import RouterDaemon
from tests.router.cluster import DEFAULT_NODES, make_topology
from tests.router.fake_node import FakeNode

KEYS_ENV = "RUYIFLOW_TEST_KEYS"
KEYS = ("key-alpha-0123456789", "key-beta-9876543210")


@pytest.fixture
def router(monkeypatch, caplog) -> Iterator[RouterDaemon]:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(KEYS_ENV, ",".join(KEYS))
    monkeypatch.delenv("RUYIFLOW_API_KEY", raising=False)
    nodes = {name: FakeNode(name, tier, exits) for name, tier, exits in DEFAULT_NODES}
    ports = {f"{name}.listen": node.start() for name, node in nodes.items()}
    topology = make_topology(DEFAULT_NODES, ports)
    topology = dataclasses.replace(
        topology, router=dataclasses.replace(topology.router, api_keys_env=KEYS_ENV)
    )
    daemon = RouterDaemon(
        topology,
        listen="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        poll_interval_s=0.05,
        rng=random.Random(0),
        serve_metrics=False,
    ).start()
    assert daemon.registry.wait_ready(5)
    yield daemon
    daemon.stop(grace=0)
    for node in nodes.values():
        node.stop()
    for key in KEYS:
        assert key not in caplog.text


def test_grpc_needs_a_valid_key(router):
    address = f"127.0.0.1:{router.port}"
    for key in (None, "wrong-key", KEYS[0] + "x"):
        with RouterClient(address, timeout=10, api_key=key) as client:
            for call in (lambda c: c.complete("Hi there!", max_tokens=2), lambda c: c.route("Hi")):
                with pytest.raises(grpc.RpcError) as err:
                    call(client)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert KEYS[0] not in err.value.details()
    with grpc.insecure_channel(address) as channel:  # a raw client with a malformed header
        stub = pb_grpc.RouterStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListNodes(pb.ListNodesRequest(), metadata=[("authorization", KEYS[0])])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # health stays open
    for key in KEYS:
        with RouterClient(address, timeout=10, api_key=key) as client:
            assert client.complete("Hi there!", max_tokens=2).token_ids == [100, 101]
            assert len(client.list_nodes()) == 3


def test_openai_api_needs_a_valid_key(router):
    base = f"http://127.0.0.1:{router.http_port}"
    for key in ("unused", "Bearer " + KEYS[1]):
        api = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as err:
            api.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
        assert err.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            api.models.list()
    with pytest.raises(urllib.error.HTTPError) as err:  # no header at all
        urllib.request.urlopen(f"{base}/v1/models", timeout=10)
    assert err.value.code == 401 and err.value.headers["www-authenticate"] == "Bearer"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as reply:
        assert reply.status == 200
    api = openai.OpenAI(base_url=f"{base}/v1", api_key=KEYS[1], max_retries=0)
    done = api.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert done.usage.completion_tokens == 2


def test_keys_config(monkeypatch):
    monkeypatch.delenv(KEYS_ENV, raising=False)
    assert ApiKeys.from_env(None) is None
    with pytest.raises(TopologyError, match="holds no key"):
        ApiKeys.from_env(KEYS_ENV)
    keys = ApiKeys(["a", "b"])
    keys.check_header("Bearer b")
    keys.check_header("bearer  a ")
    for header in (None, "", "Bearer", "Basic a", "Bearer c", "Bearer a b"):
        with pytest.raises(Unauthenticated):
            keys.check_header(header)
