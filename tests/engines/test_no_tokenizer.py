"""A `backend: openai` node without a local tokenizer (`tokenizer: none`) against the scripted
engine over loopback: conversations go to `/v1/chat/completions` and text prompts to
`/v1/completions` as text, counts come from the engine's `usage`, ids only when the engine
spells them, moves into it carry text, and whatever needs token ids is refused by name."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from ruyiflow.cloud_node.text_prompts import TEXT_ID_BASE, TextPrompts
from ruyiflow.cloud_node.token_stream import UNKNOWN_TOKEN_ID
from ruyiflow.engine.handoff import HandoffState, encode_state
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.node.framing import header_for, state_parts
from ruyiflow.proto import ruyiflow_pb2 as pb
from tests.engines.conftest import InProcessNode, start_node
from tests.engines.scripted_engine import FIRST_ID, MAX_PROB, PIECES, ScriptedEngine

QUESTION = "What is the capital of France?"


@pytest.fixture
def node(scripted: ScriptedEngine) -> Iterator[InProcessNode]:
    n = start_node(scripted.base_url, tokenizer="none")
    try:
        n.wait_health(serving=True)
        yield n
    finally:
        n.stop()


def chat(max_tokens: int = 8, **fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id="r1",
        conversation=pb.Conversation(messages=[pb.Message(role="user", content=QUESTION)]),
        sampling=pb.SamplingParams(max_tokens=max_tokens),
        **fields,
    )


def token_chunks(chunks: list[pb.Chunk]) -> list[pb.Chunk]:
    return [c for c in chunks if c.token_ids]


def test_info_says_there_is_no_tokenizer(scripted, node):
    info = node.stub.Info(pb.InfoRequest(), timeout=5)
    assert info.model_fingerprint.startswith("openai-notokenizer-")
    assert (info.backend, info.confidence) == ("openai", "logprobs")
    probe = scripted.requests[0]  # the start-up probe asked with text, never with ids
    assert isinstance(probe["prompt"], str) and probe["path"] == "/v1/completions"


def test_a_conversation_goes_to_the_chat_endpoint(scripted, node):
    chunks = list(node.stub.Generate(chat(enable_thinking=False), timeout=10))
    tokens = token_chunks(chunks)
    assert [c.text for c in tokens] == list(PIECES)  # each token with its own text
    assert [c.token_ids[0] for c in tokens] == [UNKNOWN_TOKEN_ID] * len(PIECES)
    assert [c.token_offset for c in tokens] == list(range(len(PIECES)))
    assert tokens[0].confidence[0].max_prob == pytest.approx(MAX_PROB, rel=1e-5)
    assert tokens[0].confidence[0].margin == pytest.approx(MAX_PROB - 0.05, rel=1e-5)
    assert chunks[-1].finish_reason == pb.FINISH_REASON_STOP and not chunks[-1].token_ids
    (sent,) = scripted.streamed()
    assert sent["path"] == "/v1/chat/completions"
    assert sent["messages"] == [{"role": "user", "content": QUESTION}]
    assert (sent["logprobs"], sent["top_logprobs"], sent["temperature"]) == (True, 2, 0.0)
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["chat_template_kwargs"] == {"enable_thinking": False}


def test_a_text_prompt_goes_to_completions_as_text(scripted, node):
    request = pb.GenerateRequest(
        request_id="r1", text="Paris is", sampling=pb.SamplingParams(max_tokens=3)
    )
    chunks = list(node.stub.Generate(request, timeout=10))
    assert "".join(c.text for c in chunks) == "".join(PIECES[:3])
    assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
    (sent,) = scripted.streamed()
    assert (sent["path"], sent["prompt"], sent["max_tokens"]) == ("/v1/completions", "Paris is", 3)
    assert sent["stream_options"] == {"include_usage": True} and sent["logprobs"] == 2


def test_counts_are_the_engines_usage_when_chunks_hold_several_tokens(scripted):
    """Without logprobs a chunk's tokens cannot be told apart: the node relays each chunk's
    text as one token and adds id-less empty ones up to the engine's `usage` count."""
    scripted.has_logprobs, scripted.chunk_size = False, 2
    n = start_node(scripted.base_url, tokenizer="none")
    try:
        n.wait_health(serving=True)
        assert n.stub.Info(pb.InfoRequest(), timeout=5).confidence == "none"
        chunks = list(n.stub.Generate(chat(), timeout=10))
    finally:
        n.stop()
    tokens = token_chunks(chunks)
    assert len(tokens) == len(PIECES)  # usage: 5 tokens, in 3 chunks
    assert "".join(c.text for c in chunks) == "".join(PIECES)
    assert [c.token_offset for c in tokens] == list(range(len(PIECES)))
    assert [c.text for c in tokens][-2:] == ["", ""]
    (sent,) = scripted.streamed()
    assert "logprobs" not in sent and "top_logprobs" not in sent


def test_ids_only_when_the_engine_spells_them(scripted):
    scripted.spells_ids = True
    n = start_node(scripted.base_url, tokenizer="none")
    try:
        n.wait_health(serving=True)
        chunks = list(n.stub.Generate(chat(), timeout=10))
    finally:
        n.stop()
    tokens = token_chunks(chunks)
    assert [c.token_ids[0] for c in tokens] == [FIRST_ID + i for i in range(len(PIECES))]
    assert "".join(c.text for c in chunks) == "".join(PIECES)  # the text is the chunks'
    assert scripted.streamed()[0]["return_tokens_as_token_ids"] is True


def test_a_move_into_it_continues_the_assistants_text(scripted, node):
    relayed = " Paris is"
    chunks = list(node.stub.Generate(chat(max_tokens=4, prefix_text=relayed), timeout=10))
    assert "".join(c.text for c in chunks) == "".join(PIECES[:4])
    (sent,) = scripted.streamed()
    assert sent["messages"][-1] == {"role": "assistant", "content": relayed}
    assert (sent["continue_final_message"], sent["add_generation_prompt"]) == (True, False)
    assert sent["max_tokens"] == 4  # the router's max_tokens already counts only what is left


def test_whatever_needs_token_ids_is_refused_by_name(scripted, node):
    ids = pb.GenerateRequest(
        request_id="r1", token_ids=pb.TokenIds(ids=[1, 2, 3]), sampling=pb.SamplingParams()
    )
    prefixed = chat(prefix_token_ids=[5, 6])
    stop_ids = chat()
    stop_ids.sampling.stop_token_ids.append(2)
    for request, words in [
        (ids, "token-id prompts"),
        (prefixed, "prefix_token_ids"),
        (stop_ids, "stop_token_ids"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            list(node.stub.Generate(request, timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "has no tokenizer" in err.value.details() and words in err.value.details()
    state = HandoffState(
        "tokens", "some-weights", 16, [1, 2, 3, 4], 3, SamplingParams(max_tokens=6),
        0, 0, "F32", {},
    )  # fmt: skip
    data = encode_state(state)
    with pytest.raises(grpc.RpcError) as err:
        list(node.stub.Resume(state_parts(header_for(data, "r1", 24), data), timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no tokenizer" in err.value.details() and "prefix_text" in err.value.details()
    assert scripted.streamed() == []  # nothing reached the engine


def test_text_prompts_carry_any_text_and_only_text():
    text = TextPrompts()
    sample = "naïve 中文 😀 \x00"
    assert text.decode(text.encode(sample)) == sample
    assert min(text.encode(sample)) >= TEXT_ID_BASE
    envelope = text.apply_chat_template([{"role": "user", "content": "hi"}], enable_thinking=True)
    prompt = text.chat_of(envelope)
    assert prompt.messages == [{"role": "user", "content": "hi"}] and prompt.enable_thinking
    assert text.chat_of(TextPrompts().apply_chat_template([])) is None  # another node's marker
    assert text.chat_of("hi") is None
