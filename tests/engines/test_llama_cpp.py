"""A real llama.cpp server (llama-cpp-python, the embedded SmolLM2 GGUF) behind a
`backend: openai` cloud node, beside a torch edge node, all started by `ruyiflow up`'s
Cluster on loopback: routed greedy text equals the server called directly, an escalation from
the edge continues there with no token lost or repeated, a prompt past the server's context
fails with a clear status, a client that goes away frees the engine, an engine
busy with another client's request stays serving, and killing the engine mid-stream fails
over (then `up` restarts it)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import pytest

from ruyiflow.cloud_node.openai_node import load_tokenizer
from ruyiflow.local_cluster import ENGINE_TOPOLOGY, start_local_cluster
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.client import RouterClient
from tests.engines.conftest import require_llama_cpp, start_node

TOKENIZER = load_tokenizer("smollm2")
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_llama_cpp()
    c = start_local_cluster(tmp_path_factory.mktemp("engine"), template=ENGINE_TOPOLOGY)
    yield c
    c.stop(grace=5)


def direct(cluster, prompt: str, max_tokens: int) -> dict:
    """The llama.cpp server called directly, with the settings the node sends for greedy."""
    body = {
        "model": "smollm2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "logprobs": 2,
    }  # fmt: skip
    request = urllib.request.Request(
        f"http://{cluster.addr['engine']}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def templated(question: str) -> str:
    return TOKENIZER.apply_chat_template([{"role": "user", "content": question}])


def offsets_continue(chunks: list[pb.Chunk]) -> int:
    expected = 0
    for chunk in chunks:
        assert chunk.token_offset == expected  # no gap, no repeat
        expected += len(chunk.token_ids)
    return expected


def test_routed_greedy_text_equals_the_engine_called_directly(cluster):
    with RouterClient(cluster.addr["router"]) as client:
        result = client.complete(QUESTION, max_tokens=24, exit=29)
    answer = direct(cluster, templated(QUESTION), 24)
    assert result.text == answer["choices"][0]["text"]
    assert len(result.token_ids) == answer["usage"]["completion_tokens"]
    assert [s.node for s in result.trace.spans] == ["cloud-llama"]
    # confidence from llama.cpp's logprobs: its max_prob is the top-1 of those logprobs
    top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
    assert result.confidence[0].max_prob == pytest.approx(2.718281828 ** max(top.values()))
    nodes = {n.name: n for n in RouterClient(cluster.addr["router"]).list_nodes()}
    assert nodes["cloud-llama"].info.confidence == "logprobs"


def test_escalation_from_a_torch_edge_exit_continues_on_the_engine(cluster):
    escalation = {"enabled": True, "force_after_tokens": 4, "force_to_exit": 29}
    with RouterClient(cluster.addr["router"]) as client:
        chunks = list(client.generate(QUESTION, max_tokens=16, exit=16, escalation=escalation))
    assert offsets_continue(chunks) == 16
    trace = chunks[-1].trace
    assert [(s.node, s.exit) for s in trace.spans] == [("edge-0", 16), ("cloud-llama", 29)]
    (move,) = trace.handoffs
    assert move.mode == pb.HANDOFF_MODE_TOKENS  # hidden states cannot enter an engine
    edge_ids = [t for c in chunks if c.source.node == "edge-0" for t in c.token_ids]
    assert len(edge_ids) == 4
    engine_text = "".join(c.text for c in chunks if c.source.node == "cloud-llama")
    prompt_ids = TOKENIZER.encode(templated(QUESTION))
    answer = direct(cluster, TOKENIZER.decode(prompt_ids + edge_ids), 16 - 4)
    assert engine_text == answer["choices"][0]["text"]


def test_a_prompt_past_the_servers_context_fails_clearly(cluster):
    """A node allowing more context than the server's n_ctx (2048) passes a long prompt on.
    llama-cpp-python refuses it with HTTP 400 only when not streaming; a streamed request gets
    HTTP 200 and an empty body. The client gets UNAVAILABLE naming the engine and what went
    wrong, at once, never a hung stream."""
    node = start_node(f"http://{cluster.addr['engine']}/v1", model="smollm2", max_context=8192)
    try:
        node.wait_health(serving=True, timeout=60)
        request = pb.GenerateRequest(
            request_id="too-long",
            text=" ".join(["lighthouse"] * 2100),
            sampling=pb.SamplingParams(max_tokens=4),
        )
        with pytest.raises(grpc.RpcError) as err:
            list(node.stub.Generate(request, timeout=60))
    finally:
        node.stop()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details()
    assert cluster.addr["engine"] in details and "closed the stream before [DONE]" in details


def test_a_client_that_goes_away_frees_the_engine(cluster):
    with RouterClient(cluster.addr["router"]) as client:
        stream = client.generate("Tell me a very long story.", max_tokens=1900, exit=29)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # cancels the router call -> the node -> the HTTP request
    started = time.monotonic()
    direct(cluster, "Hello", 1)  # llama.cpp's server runs one request at a time
    assert time.monotonic() - started < 5, "the cancelled request kept the engine busy"


def test_an_engine_busy_with_another_client_stays_serving(cluster):
    """llama.cpp's server answers /v1/models only between requests: another client's request
    holding the health poll past its timeout is busy, not down (down takes `timeout_s`, 30 s,
    with no answer). The request is sized to last ~8 s at the machine's current speed; the
    speed changes under a parallel suite, so a request that ended in under 4 s is made longer
    and run again."""
    counting = ", ".join(str(i) for i in range(1, 21)) + ","  # goes on counting, no EOS
    started = time.monotonic()
    direct(cluster, counting, 4)
    four_s = time.monotonic() - started
    started = time.monotonic()
    direct(cluster, counting, 20)
    per_token = max(1e-3, (time.monotonic() - started - four_s) / 16)  # decode only
    num_tokens = max(16, min(1800, int(8 / per_token)))
    for _ in range(4):
        busy_s, healthy = busy_while_polling(cluster, counting, num_tokens)
        assert all(healthy), f"NOT_SERVING while busy for {busy_s:.1f} s: {healthy}"
        if busy_s > 4 or num_tokens == 1800:
            break
        num_tokens = min(1800, int(num_tokens * 8 / busy_s))
    assert busy_s > 4, f"{num_tokens} tokens took {busy_s:.1f} s: too short to hold a poll"


def busy_while_polling(cluster, prompt: str, num_tokens: int) -> tuple[float, list[bool]]:
    """Run `num_tokens` of another client's request on the engine while asking the router
    every 0.5 s whether the engine's node serves: (seconds busy, each answer)."""
    other = threading.Thread(target=direct, args=(cluster, prompt, num_tokens))
    started = time.monotonic()
    other.start()
    healthy = []
    with RouterClient(cluster.addr["router"]) as client:
        while other.is_alive():
            time.sleep(0.5)
            healthy.append({n.name: n.healthy for n in client.list_nodes()}["cloud-llama"])
    return time.monotonic() - started, healthy


def test_killing_the_engine_mid_stream_fails_over_and_up_restarts_it(cluster):
    (engine,) = cluster.engines.engines
    with RouterClient(cluster.addr["router"]) as client:
        chunks, killed = [], False
        for chunk in client.generate("Write a story about a lighthouse.", max_tokens=30, exit=29):
            chunks.append(chunk)
            if not killed and sum(len(c.token_ids) for c in chunks) >= 3:
                engine.proc.kill()
                killed = True
    assert killed and offsets_continue(chunks) == 30
    trace = chunks[-1].trace
    assert trace.num_retries == 1
    assert [s.node for s in trace.spans] == ["cloud-llama", "edge-0"]
    deadline = time.monotonic() + 90  # restarted by the supervisor, then polled healthy
    while time.monotonic() < deadline:
        nodes = {n.name: n for n in RouterClient(cluster.addr["router"]).list_nodes()}
        if nodes["cloud-llama"].healthy:
            break
        time.sleep(0.5)
    assert nodes["cloud-llama"].healthy and engine.num_restarts == 1


def direct_chat(cluster, question: str, max_tokens: int) -> dict:
    """llama.cpp's own chat endpoint, with the settings a node without a tokenizer sends."""
    body = {
        "model": "smollm2", "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
        "repeat_penalty": 1.0, "logprobs": True, "top_logprobs": 2,
    }  # fmt: skip
    request = urllib.request.Request(
        f"http://{cluster.addr['engine']}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def test_a_node_without_tokenizer_equals_the_engine_called_directly(cluster):
    """`tokenizer: none`: a conversation through llama.cpp's chat endpoint and a text prompt
    through its completions, each equal to the server called directly; the token count is the
    server's usage."""
    node = start_node(f"http://{cluster.addr['engine']}/v1", model="smollm2", tokenizer="none")
    try:
        node.wait_health(serving=True, timeout=60)
        info = node.stub.Info(pb.InfoRequest(), timeout=5)
        assert info.model_fingerprint.startswith("openai-notokenizer-")
        messages = [pb.Message(role="user", content=QUESTION)]
        request = pb.GenerateRequest(
            request_id="chat",
            conversation=pb.Conversation(messages=messages),
            sampling=pb.SamplingParams(max_tokens=16),
        )
        chat_chunks = list(node.stub.Generate(request, timeout=120))
        request = pb.GenerateRequest(
            request_id="text",
            text="The capital of France is",
            sampling=pb.SamplingParams(max_tokens=12),
        )
        text_chunks = list(node.stub.Generate(request, timeout=120))
    finally:
        node.stop()
    answer = direct_chat(cluster, QUESTION, 16)
    assert "".join(c.text for c in chat_chunks) == answer["choices"][0]["message"]["content"]
    assert offsets_continue(chat_chunks) == answer["usage"]["completion_tokens"]
    answer = direct(cluster, "The capital of France is", 12)
    assert "".join(c.text for c in text_chunks) == answer["choices"][0]["text"]
    assert offsets_continue(text_chunks) == answer["usage"]["completion_tokens"]
