"""Every refusal of the OpenAI API, with its status and OpenAI error object, through the
official client against a router in front of fake nodes: fields we cannot honour are named,
neutral values of them are accepted, and node failures map to 429 / 503."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from tests.http.conftest import api_client
from tests.router.cluster import Cluster

USER = [{"role": "user", "content": "Hi there!"}]


def refused(call, status: int, param: str | None, code: str | None = None) -> dict:
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert info.value.status_code == status, info.value.body
    error = info.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code
    return error


BAD_CHAT_FIELDS = [
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"n": 2}, "n"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
    ),
    ({"logprobs": True, "temperature": 0.7}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 1}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"max_tokens": 2**40}, "max_tokens"),
    ({"extra_body": {"ruyiflow": {"exit": 2**40}}}, "ruyiflow.exit"),
    (
        {"extra_body": {"chat_template_kwargs": {"add_generation_prompt": False}}},
        "chat_template_kwargs.add_generation_prompt",
    ),
    ({"extra_body": {"ruyiflow": {"tier": "fog"}}}, "ruyiflow.tier"),
    ({"extra_body": {"ruyiflow": {"handoff_mode": "carrier pigeon"}}}, "ruyiflow.handoff_mode"),
    ({"extra_body": {"ruyiflow": {"speed": "fast"}}}, "ruyiflow.speed"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"temperature": "warm"}, "temperature"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_CHAT_FIELDS, ids=lambda v: str(v)[:40])
def test_chat_fields_we_cannot_honour_are_400_naming_the_field(fake_api, fields, param):
    fields = {"messages": USER, **fields}
    error = refused(lambda: fake_api.chat.completions.create(model="auto", **fields), 400, param)
    assert error["type"] == "invalid_request_error"


def test_neutral_values_of_unsupported_fields_are_accepted(fake_api):
    got = fake_api.chat.completions.create(
        model="auto",
        messages=USER,
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        tools=[],
        response_format={"type": "text"},
        n=1,
        user="someone",  # accepted and ignored
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert got.choices[0].message.content == "t100 t101 "


def test_router_side_validation_is_a_400(fake_api):
    error = refused(
        lambda: fake_api.chat.completions.create(model="auto", messages=USER, temperature=9),
        400,
        None,
    )
    assert "temperature must be in" in error["message"]
    error = refused(
        lambda: fake_api.chat.completions.create(
            model="auto", messages=USER, extra_body={"ruyiflow": {"exit": 13}}
        ),
        400,
        None,
    )
    assert "unknown exit 13" in error["message"]


def test_completions_refusals(fake_api):
    create = fake_api.completions.create
    refused(lambda: create(model="auto", prompt=["a", "b"]), 400, "prompt")
    refused(lambda: create(model="auto", prompt="a", echo=True), 400, "echo")
    refused(lambda: create(model="auto", prompt="a", logprobs=2), 400, "logprobs")
    refused(lambda: create(model="auto", prompt="a", suffix="z"), 400, "suffix")
    refused(lambda: create(model="auto", prompt=[-1]), 400, "prompt")


def test_unknown_model_is_404(fake_api):
    error = refused(
        lambda: fake_api.chat.completions.create(model="gpt-4o", messages=USER), 404, "model"
    )
    assert error["code"] == "model_not_found" and "auto, smollm2" in error["message"]


def test_too_large_is_413(fake_api):
    big = "x" * (40 << 10)
    refused(
        lambda: fake_api.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": big}]
        ),
        413,
        "messages",
    )
    refused(lambda: fake_api.completions.create(model="auto", prompt=[1] * 5000), 413, "prompt")
    refused(lambda: fake_api.completions.create(model="auto", prompt="y" * (2 << 20)), 413, None)


def post(address: str, path: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://{address}{path}", body, {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_malformed_bodies_and_paths(fake):
    address = f"127.0.0.1:{fake.daemon.http_port}"
    status, body = post(address, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(address, "/v1/chat/completions", b'{"model": "auto", "messages": []}')
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = post(address, "/v1/embeddings", b"{}")
    assert status == 404 and body["error"]["code"] == "not_found"


@pytest.fixture
def lonely():
    """A router of its own: the test breaks its nodes."""
    nodes = (("edge-0", "edge", (12, 16)), ("cloud-0", "cloud", (20, 24, 29)))
    cluster = Cluster(nodes=nodes, http_address="127.0.0.1:0")
    yield cluster
    cluster.close()


def test_overloaded_node_is_429_and_no_node_is_503(lonely):
    api = api_client(f"127.0.0.1:{lonely.daemon.http_port}")
    for node in lonely.nodes.values():
        node.behaviour.error = (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    error = refused(lambda: api.chat.completions.create(model="auto", messages=USER), 429, None)
    assert error["type"] == "rate_limit_error" and "queue full" in error["message"]
    for name, node in lonely.nodes.items():
        node.stop()
        lonely.registry.mark_failed(name)
    error = refused(lambda: api.chat.completions.create(model="auto", messages=USER), 503, None)
    assert error["type"] == "server_error" and "no healthy node" in error["message"]


def test_a_bug_is_a_500_without_internals(fake_api, fake, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("secret detail " * 40)

    monkeypatch.setattr(fake.servicer, "generate", broken)
    error = refused(
        lambda: fake_api.chat.completions.create(model="auto", messages=USER), 500, None
    )
    assert error["type"] == "server_error" and len(error["message"]) < 260
