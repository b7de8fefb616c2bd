"""A `backend: openai` node against a scripted engine over loopback: the Node contract
(Generate, Info, Resume, handoff out), token ids and confidence from logprobs, the prompt it
sends, and clear statuses for every way an engine fails."""

from __future__ import annotations

import math

import grpc
import pytest

from ruyiflow.cloud_node.openai_node import load_tokenizer
from ruyiflow.engine.handoff import HandoffState, RawTensor, encode_state, peek_metadata
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.node.framing import header_for, state_parts
from ruyiflow.proto import ruyiflow_pb2 as pb
from tests.engines.conftest import start_node
from tests.engines.scripted_engine import MAX_PROB, PIECES

TOKENIZER = load_tokenizer("smollm2")
QUESTION = [pb.Message(role="user", content="What is the capital of France?")]


def ask(max_tokens: int = 8, **escalation: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id="r1",
        conversation=pb.Conversation(messages=QUESTION),
        sampling=pb.SamplingParams(max_tokens=max_tokens),
        escalation=pb.EscalationSettings(**escalation),
    )


def test_info_says_backend_and_confidence_source(scripted_node):
    _, node = scripted_node
    info = node.stub.Info(pb.InfoRequest(), timeout=5)
    assert (info.backend, info.confidence, list(info.exits)) == ("openai", "logprobs", [24])
    assert info.shape.num_layers == 0  # not ours to know: the router's cost model takes tokens
    assert info.model_fingerprint.startswith("openai-")


def test_streams_ids_confidence_and_a_final_chunk(scripted_node):
    engine, node = scripted_node
    chunks = list(node.stub.Generate(ask(), timeout=10))
    tokens = [c for c in chunks if c.token_ids]
    assert [t for c in tokens for t in c.token_ids] == [TOKENIZER.encode(p)[0] for p in PIECES]
    assert "".join(c.text for c in chunks) == "".join(PIECES)
    assert [c.token_offset for c in tokens] == list(range(len(PIECES)))
    first = tokens[0].confidence[0]
    assert first.max_prob == pytest.approx(MAX_PROB, rel=1e-5)
    assert first.margin == pytest.approx(MAX_PROB - 0.05, rel=1e-5)
    assert first.entropy > 0
    assert chunks[0].num_prompt_tokens > 0
    # the engine's last chunk has no token: the node ends with a token-less STOP chunk
    assert not chunks[-1].token_ids and chunks[-1].finish_reason == pb.FINISH_REASON_STOP
    # llama.cpp's server takes no ids: the prompt went as our chat-templated text
    (sent,) = engine.streamed()
    template = TOKENIZER.apply_chat_template([{"role": "user", "content": QUESTION[0].content}])
    assert sent["prompt"] == template
    assert (sent["temperature"], sent["logprobs"], sent["repeat_penalty"]) == (0.0, 2, 1.0)


def test_token_id_prompts_when_the_engine_takes_them(scripted):
    scripted.accepts_ids = True
    node = start_node(scripted.base_url)
    try:
        node.wait_health(serving=True)
        list(node.stub.Generate(ask(max_tokens=2), timeout=10))
        (sent,) = scripted.streamed()
        template = TOKENIZER.apply_chat_template([{"role": "user", "content": QUESTION[0].content}])
        assert sent["prompt"] == TOKENIZER.encode(template)
        assert sent["max_tokens"] == 2
    finally:
        node.stop()


def test_without_logprobs_the_node_says_so_and_never_escalates(scripted):
    scripted.has_logprobs = False
    node = start_node(scripted.base_url)
    try:
        node.wait_health(serving=True)
        assert node.stub.Info(pb.InfoRequest(), timeout=5).confidence == "none"
        chunks = list(node.stub.Generate(ask(force_after_tokens=1), timeout=10))
        assert all(c.finish_reason != pb.FINISH_REASON_HANDOFF for c in chunks)
        assert {c.confidence[0].max_prob for c in chunks if c.token_ids} == {1.0}
        assert "".join(c.text for c in chunks) == "".join(PIECES)
    finally:
        node.stop()


def test_low_confidence_parks_a_tokens_state(scripted_node):
    _, node = scripted_node
    chunks = list(node.stub.Generate(ask(enabled=True, window=2, threshold=0.95), timeout=10))
    assert chunks[-1].finish_reason == pb.FINISH_REASON_HANDOFF
    handoff = chunks[-1].handoff
    assert (handoff.from_exit, handoff.suggested_to_exit) == (24, 29)
    generated = [t for c in chunks for t in c.token_ids]
    assert len(generated) == 2
    ref = pb.StateRef(state_handle=handoff.state_handle, mode=pb.HANDOFF_MODE_TOKENS, to_exit=29)
    parts = list(node.stub.FetchState(ref, timeout=5))
    data = b"".join(p.data.data for p in parts if p.WhichOneof("part") == "data")
    meta = peek_metadata(data)
    assert meta["mode"] == "tokens" and meta["exit"] == 24
    assert meta["token_ids"][meta["num_prompt_tokens"] :] == generated


def _state(mode: str, prompt: list[int], generated: list[int]) -> bytes:
    tensors = {"boundary": RawTensor("F32", (1, 1), b"\0" * 4)} if mode == "hidden" else {}
    state = HandoffState(
        mode, "some-weights", 16, prompt + generated, len(prompt), SamplingParams(max_tokens=6),
        0, 0, "F32", tensors,
    )  # fmt: skip
    return encode_state(state)


def test_resume_with_a_hidden_state_is_refused_by_name(scripted_node):
    _, node = scripted_node
    data = _state("hidden", [1, 2, 3], [4])
    with pytest.raises(grpc.RpcError) as err:
        list(node.stub.Resume(state_parts(header_for(data, "r1", 24), data), timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "tokens-mode" in err.value.details() and "hidden" in err.value.details()


def test_resume_in_tokens_mode_continues_after_the_prefix(scripted_node):
    engine, node = scripted_node
    prompt, generated = TOKENIZER.encode("Hello there"), TOKENIZER.encode(" friend")
    data = _state("tokens", prompt, generated)
    chunks = list(node.stub.Resume(state_parts(header_for(data, "r1", 24), data), timeout=10))
    assert chunks[0].token_offset == len(generated)  # offsets go on after the prefix
    (sent,) = engine.streamed()
    assert sent["prompt"] == TOKENIZER.decode(prompt + generated)
    assert sent["max_tokens"] == 6 - len(generated)  # max_tokens counts the prefix


@pytest.mark.parametrize(
    ("mode", "code", "words"),
    [
        ("http400", grpc.StatusCode.INVALID_ARGUMENT, "HTTP 400: max_tokens is too large"),
        ("http500", grpc.StatusCode.UNAVAILABLE, "HTTP 500: CUDA out of memory"),
        ("malformed", grpc.StatusCode.UNAVAILABLE, "malformed event"),
        ("cut", grpc.StatusCode.UNAVAILABLE, "closed the stream before [DONE]"),
        ("stall", grpc.StatusCode.UNAVAILABLE, "timed out"),
    ],
)
def test_engine_failures_give_clear_statuses(scripted_node, mode, code, words):
    engine, node = scripted_node
    engine.mode = mode
    with pytest.raises(grpc.RpcError) as err:
        list(node.stub.Generate(ask(), timeout=20))
    assert err.value.code() == code
    assert words in err.value.details() and engine.base_url.removesuffix("/v1") in (
        err.value.details()
    )


def test_unreachable_engine_means_not_serving_never_a_hung_stream(scripted):
    node = start_node(scripted.base_url)
    try:
        node.wait_health(serving=True)
        scripted.stop()  # the engine goes away: within a poll the node stops serving
        node.wait_health(serving=False, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            list(node.stub.Generate(ask(), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not serving" in err.value.details()
    finally:
        node.stop()


def test_a_base_url_nobody_answers_never_serves():
    node = start_node("http://127.0.0.1:9/v1")  # the discard port: nothing listens
    try:
        node.wait_health(serving=False, timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            node.stub.Info(pb.InfoRequest(), timeout=5)
            list(node.stub.Generate(ask(), timeout=10))
            pytest.fail("a node without its engine served a request")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        node.stop()


def test_entropy_is_a_lower_bound_of_the_full_distribution():
    from ruyiflow.cloud_node.token_stream import confidence_of

    c = confidence_of({"a": math.log(0.5), "b": math.log(0.3)})
    full = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert (c.max_prob, c.margin) == pytest.approx((0.5, 0.2))
    assert c.entropy == pytest.approx(full)  # the rest (0.2) taken as one outcome
