"""The OpenAI API against a real node daemon (embedded SmolLM2), through the official `openai`
client: the same greedy text as the gRPC client, streamed or not; usage counts; completions
from text and token ids; the Ruyi demo's sampling settings; overrides forcing an exit and an
escalation, visible in the trace and invisible in the text; logprobs; a client that
disconnects stops generation on the node. (Moves between nodes, failover included, are driven
through HTTP with fake nodes in test_openai_stream.py.)"""

from __future__ import annotations

import http.client
import json
import time
import urllib.request

import pytest

from ruyiflow.router.client import RouterClient

EASY = "What is the capital of France?"
EASY_PROMPT_TOKENS = 37  # engine.tokenizer on SmolLM2's chat template (its default system turn)
PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690]
DEMO = {"top_k": 30, "repetition_penalty": 1.2, "no_repeat_ngram_size": 3}  # + temp, top_p
ESCALATE = {"exit": 16, "escalation": {"force_after_tokens": 3, "force_to_exit": 20}}


@pytest.fixture(scope="module")
def grpc_client(real):
    with RouterClient(real["router"], timeout=60) as client:
        yield client


def chat(api, **kwargs):
    kwargs.setdefault("messages", [{"role": "user", "content": EASY}])
    return api.chat.completions.create(model="auto", **kwargs)


def test_models_list_the_topology_with_max_model_len(real_api):
    models = real_api.models.list().data
    assert [m.id for m in models] == ["smollm2"]
    assert models[0].max_model_len == 2048  # node-0's max_context


def test_chat_equals_the_grpc_client_streamed_or_not(real_api, grpc_client):
    want = grpc_client.complete(EASY, max_tokens=12, exit=12)
    whole = chat(real_api, max_tokens=12, extra_body={"ruyiflow": {"exit": 12}})
    assert whole.choices[0].message.content == want.text and want.text
    assert whole.choices[0].finish_reason == want.finish_reason == "length"
    assert whole.id.startswith("chatcmpl-") and whole.model == "smollm2"
    assert whole.usage.prompt_tokens == EASY_PROMPT_TOKENS
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == 12 + 37
    assert whole.ruyiflow["spans"] == [
        {"node": "node-0", "tier": "cloud", "exit": 12, "num_tokens": 12}
    ]
    events = list(chat(real_api, max_tokens=12, stream=True, extra_body={"ruyiflow": {"exit": 12}}))
    assert len({e.id for e in events}) == 1
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == want.text
    assert [e.choices[0].finish_reason for e in events][-1] == "length"
    assert all(e.choices[0].finish_reason is None for e in events[:-1])


def test_routed_without_overrides_like_grpc(real_api, grpc_client):
    want = grpc_client.complete(EASY, max_tokens=6)
    got = chat(real_api, max_tokens=6)
    assert got.choices[0].message.content == want.text
    assert got.ruyiflow["spans"][0]["exit"] == want.trace.spans[0].exit
    assert got.ruyiflow["difficulty"] == pytest.approx(want.trace.difficulty, abs=1e-4)


def test_include_usage_ends_with_a_usage_chunk_then_done(real_api):
    events = list(chat(real_api, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    *content, last = events
    assert last.choices == [] and last.usage.completion_tokens == 4
    assert last.usage.prompt_tokens == EASY_PROMPT_TOKENS
    assert content[-1].choices[0].finish_reason == "length"
    assert all(e.usage is None for e in content)


def test_completions_from_text_and_from_token_ids(real_api, grpc_client):
    text = real_api.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5
    )
    assert text.object == "text_completion" and text.id.startswith("cmpl-")
    assert (
        text.choices[0].text
        == grpc_client.complete(raw=True, prompt="The capital of France is", max_tokens=5).text
    )
    ids = real_api.completions.create(model="auto", prompt=PROMPT_IDS, max_tokens=5)
    assert ids.usage.prompt_tokens == len(PROMPT_IDS) and ids.usage.completion_tokens == 5
    assert ids.choices[0].text == grpc_client.complete(token_ids=PROMPT_IDS, max_tokens=5).text
    streamed = real_api.completions.create(
        model="auto", prompt=PROMPT_IDS, max_tokens=5, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == ids.choices[0].text


def test_the_ruyi_demo_sampling_settings_are_accepted_and_seeded(real_api):
    def sample():
        return chat(
            real_api,
            max_tokens=10,
            temperature=0.6,
            top_p=0.95,
            seed=7,
            extra_body={**DEMO, "min_p": 0.05, "ruyiflow": {"exit": 20}},
        )

    first, second = sample(), sample()
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage.completion_tokens >= 1


def test_overrides_force_an_exit_and_an_escalation_seen_in_the_trace(real_api, grpc_client):
    want = grpc_client.complete(EASY, max_tokens=10, exit=16, escalation=ESCALATE["escalation"])
    whole = real_api.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": EASY}],
        max_tokens=10,
        extra_body={"ruyiflow": ESCALATE},
    )
    assert whole.headers["x-ruyiflow-route"] == "node-0/cloud/16, node-0/cloud/20"
    body = whole.parse()
    assert body.choices[0].message.content == want.text
    (move,) = body.ruyiflow["handoffs"]
    assert (move["from_exit"], move["to_exit"], move["to_node"]) == (16, 20, "node-0")
    assert [s["num_tokens"] for s in body.ruyiflow["spans"]] == [3, 7]
    events = list(chat(real_api, max_tokens=10, stream=True, extra_body={"ruyiflow": ESCALATE}))
    assert "".join(e.choices[0].delta.content or "" for e in events) == want.text
    moves = events[-1].ruyiflow["handoffs"]  # the trace, on the final chunk
    assert [(m["from_exit"], m["to_exit"], m["to_node"]) for m in moves] == [(16, 20, "node-0")]


def test_greedy_logprobs_are_the_chosen_tokens(real_api):
    got = chat(real_api, max_tokens=5, logprobs=True, top_logprobs=1)
    content = got.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == got.choices[0].message.content
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob == t.logprob for t in content)


def metric(address: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_client_that_disconnects_stops_generation_on_the_node(real):
    node_m, router_m = real["node_metrics"], real["router_metrics"]
    tokens_before = metric(node_m, "ruyiflow_node_tokens_generated_total")
    host, port = real["http"].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": EASY}],
        "max_tokens": 500,
        "stream": True,
        "ruyiflow": {"exit": 29},
    }
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # generation has begun
    assert metric(node_m, "ruyiflow_node_in_flight") == 1
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if metric(node_m, "ruyiflow_node_in_flight") == 0:
            break
        time.sleep(0.05)
    assert metric(node_m, "ruyiflow_node_in_flight") == 0
    assert metric(router_m, "ruyiflow_router_in_flight_requests") == 0
    assert metric(node_m, "ruyiflow_node_tokens_generated_total") - tokens_before < 500
    cancelled = {"api": "openai", "outcome": "cancelled"}
    assert metric(router_m, "ruyiflow_router_requests_total", **cancelled) == 1
