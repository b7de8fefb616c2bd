"""The HTTP side of the OpenAI API with fake nodes (deterministic tokens `t100 `, `t101 `, ...):
the SSE framing byte for byte, a failover and a handoff mid-stream invisible in the text, a
client that disconnects, metrics labelled by front end, /health, /version and /v1/models."""

from __future__ import annotations

import http.client
import json
import socket
import time

import openai
import pytest

from tests.http.conftest import api_client
from tests.router.cluster import Cluster

USER = [{"role": "user", "content": "Hi there!"}]


def raw_post(port: int, path: str, body: dict) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


def test_chat_stream_framing_byte_for_byte(fake):
    body = {
        "model": "auto",
        "messages": USER,
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ruyiflow": {"node": "edge-0", "exit": 12},
    }
    response, data = raw_post(fake.daemon.http_port, "/v1/chat/completions", body)
    assert response.status == 200
    assert response.getheader("content-type") == "text/event-stream; charset=utf-8"
    assert response.getheader("x-ruyiflow-route") == "edge-0/edge/12"
    first = json.loads(data.split(b"\n\n")[0].removeprefix(b"data: "))
    head = f'"id":"{first["id"]}","object":"chat.completion.chunk","created":{first["created"]}'
    head += ',"model":"smollm2"'
    final = json.loads(data.split(b"\n\n")[3].removeprefix(b"data: "))
    trace = json.dumps(final["ruyiflow"], separators=(",", ":"))
    choice = '{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}'
    events = [
        (choice % ('{"role":"assistant","content":""}', "null"), ""),
        (choice % ('{"content":"t100 "}', "null"), ""),
        (choice % ('{"content":"t101 "}', "null"), ""),
        (choice % ('{"content":""}', '"length"'), ',"ruyiflow":' + trace),
        ("", ',"usage":{"prompt_tokens":0,"completion_tokens":2,"total_tokens":2}'),
    ]
    want = [f'data: {{{head},"choices":[{c}]{extra}}}\n\n' for c, extra in events]
    assert data == ("".join(want) + "data: [DONE]\n\n").encode()
    assert first["id"] == "chatcmpl-" + response.getheader("x-request-id")
    assert final["ruyiflow"]["spans"] == [
        {"node": "edge-0", "tier": "edge", "exit": 12, "num_tokens": 2}
    ]


def test_completion_stream_framing_byte_for_byte(fake):
    body = {"model": "smollm2", "prompt": [1, 2, 3], "max_tokens": 1, "stream": True}
    response, data = raw_post(fake.daemon.http_port, "/v1/completions", body)
    first = json.loads(data.split(b"\n\n")[0].removeprefix(b"data: "))
    trace = json.dumps(
        json.loads(data.split(b"\n\n")[1].removeprefix(b"data: "))["ruyiflow"],
        separators=(",", ":"),
    )
    head = (
        f'"id":"{first["id"]}","object":"text_completion","created":{first["created"]},'
        '"model":"smollm2"'
    )
    choice = '{"index":0,"text":%s,"logprobs":null,"finish_reason":%s}'
    token, final = choice % ('"t100 "', "null"), choice % ('""', '"length"')
    want = (
        f'data: {{{head},"choices":[{token}]}}\n\n'
        f'data: {{{head},"choices":[{final}],"ruyiflow":{trace}}}\n\n'
        "data: [DONE]\n\n"
    ).encode()
    assert data == want and first["id"].startswith("cmpl-")


def test_non_streaming_answer_and_headers(fake):
    body = {"model": "auto", "messages": USER, "max_tokens": 3}
    response, data = raw_post(fake.daemon.http_port, "/v1/chat/completions", body)
    answer = json.loads(data)
    assert response.getheader("content-type") == "application/json"
    assert response.getheader("x-ruyiflow-route") == "edge-0/edge/12" or "edge-1/edge/12"
    assert float(response.getheader("x-ruyiflow-difficulty")) == answer["ruyiflow"]["difficulty"]
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"] == {
        "role": "assistant",
        "content": "t100 t101 t102 ",
    }
    assert answer["usage"] == {"prompt_tokens": 0, "completion_tokens": 3, "total_tokens": 3}


def test_failover_and_handoff_mid_stream_are_invisible_in_the_text(fake_api, fake):
    fake.nodes["edge-0"].behaviour.die_after = 2
    try:
        events = list(
            fake_api.chat.completions.create(
                model="auto",
                messages=USER,
                max_tokens=6,
                stream=True,
                extra_body={
                    "ruyiflow": {
                        "node": "edge-0",
                        "exit": 12,
                        "escalation": {"force_after_tokens": 4, "force_to_exit": 20},
                    }
                },
            )
        )
    finally:
        fake.nodes["edge-0"].behaviour.die_after = None
        assert fake.registry.wait_ready(5)  # the failure marked edge-0 down until a poll
    text = "".join(e.choices[0].delta.content or "" for e in events)
    assert text == "".join(f"t{100 + k} " for k in range(6))
    trace = events[-1].ruyiflow
    assert trace["num_retries"] == 1
    reasons = [h["reason"] for h in trace["handoffs"]]
    assert reasons == ["node_failure", "forced"], trace


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_disconnect_cancels_the_node_stream(fake, stream):
    node = fake.nodes["edge-0"]
    node.behaviour.token_delay_s = 0.05
    cancelled_before, asked_before = node.num_cancelled, len(node.generate_requests)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", fake.daemon.http_port, timeout=10)
        body = {
            "model": "auto",
            "messages": USER,
            "max_tokens": 200,
            "stream": stream,
            "ruyiflow": {"node": "edge-0"},
        }
        conn.request("POST", "/v1/chat/completions", json.dumps(body))
        if stream:
            assert conn.getresponse().readline().startswith(b"data: ")
        else:
            deadline = time.monotonic() + 5
            while len(node.generate_requests) == asked_before and time.monotonic() < deadline:
                time.sleep(0.01)  # wait until the node generates (no answer before it ends)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + 5
        while node.num_cancelled == cancelled_before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert node.num_cancelled == cancelled_before + 1
        while fake.servicer._load.num_in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.servicer._load.num_in_flight == 0
    finally:
        node.behaviour.token_delay_s = 0.0


def test_metrics_count_http_requests_by_front_end(fake_api, fake):
    def count(name: str, **labels: str) -> float:
        return fake.daemon.metrics.registry.get_sample_value(name, labels) or 0.0

    ok = {"tier": "edge", "exit": "12", "outcome": "ok"}
    before = count("ruyiflow_router_requests_total", **ok, api="openai")
    grpc_before = count("ruyiflow_router_requests_total", **ok, api="grpc")
    invalid_before = count(
        "ruyiflow_router_rejected_requests_total", outcome="invalid", api="openai"
    )
    fake_api.chat.completions.create(model="auto", messages=USER, max_tokens=1)
    fake.client.complete("Hi there!", max_tokens=1)
    try:
        fake_api.chat.completions.create(model="auto", messages=USER, temperature=9)
    except openai.BadRequestError:
        pass
    assert count("ruyiflow_router_requests_total", **ok, api="openai") == before + 1
    assert count("ruyiflow_router_requests_total", **ok, api="grpc") == grpc_before + 1
    rejected = count("ruyiflow_router_rejected_requests_total", outcome="invalid", api="openai")
    assert rejected == invalid_before + 1


def test_models_health_and_version(fake_api, fake):
    (card,) = fake_api.models.list().data
    assert card.id == "smollm2" and card.max_model_len == 2048
    assert card.ruyiflow == {"routed": True, "nodes": ["edge-0", "edge-1", "cloud-0"]}
    port = fake.daemon.http_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/version")
    assert json.loads(conn.getresponse().read())["api"] == "openai"
    conn.request("GET", "/health")
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["status"] == "ok"


def test_health_is_503_without_a_serving_node():
    nodes = (("edge-0", "edge", (12, 16)), ("cloud-0", "cloud", (20, 24, 29)))
    cluster = Cluster(nodes=nodes, http_address="127.0.0.1:0")
    try:
        for name, node in cluster.nodes.items():
            node.stop()
            cluster.registry.mark_failed(name)
        conn = http.client.HTTPConnection("127.0.0.1", cluster.daemon.http_port, timeout=10)
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 503
        assert json.loads(response.read()) == {
            "status": "unavailable",
            "nodes": {"edge-0": False, "cloud-0": False},
        }
        api = api_client(f"127.0.0.1:{cluster.daemon.http_port}")
        assert api.models.list().data[0].id == "smollm2"  # listing needs no node
    finally:
        cluster.close()


def test_a_failure_after_the_first_token_ends_the_stream_with_an_error_event():
    cluster = Cluster(http_address="127.0.0.1:0", max_retries=0)
    try:
        cluster.nodes["edge-0"].behaviour.die_after = 2
        body = {"model": "auto", "messages": USER, "max_tokens": 5, "stream": True}
        body["ruyiflow"] = {"node": "edge-0"}
        response, data = raw_post(cluster.daemon.http_port, "/v1/chat/completions", body)
        assert response.status == 200  # the headers were out before the node broke
        *_, error, done, end = data.split(b"\n\n")
        assert (done, end) == (b"data: [DONE]", b"")
        detail = json.loads(error.removeprefix(b"data: "))["error"]
        assert detail["type"] == "server_error" and "all 0 retries are used" in detail["message"]
        assert b"t100 " in data and b"t101 " in data
    finally:
        cluster.close()
