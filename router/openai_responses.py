"""Router chunks -> OpenAI answers: a whole `chat.completion` / `text_completion`, or the events of
a stream (the chat role chunk, content chunks, the finish chunk carrying the route trace, the
usage chunk, `[DONE]`). Translation only: the chunks come from `RouterServicer.generate`.

Logprobs are ln(max_prob) of each token under the exit that produced it; the request side
(`openai_requests`) allows them only where that is the chosen token's log-probability.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from pydantic import BaseModel

from ruyiflow.cluster.openai_types import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ruyiflow.cluster.wire import TIER
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.openai_requests import AnswerSpec
from ruyiflow.router.trace_view import trace_to_dict

FINISH = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CANCELLED: "abort",  # vLLM's word; only a client that left gets it
}
DONE = b"data: [DONE]\n\n"


def sse(model: BaseModel) -> bytes:
    """One server-sent event: `data: {json}` and a blank line."""
    return b"data: " + model.model_dump_json().encode() + b"\n\n"


def route_header(spans: list[pb.RouteSpan] | list[pb.Source]) -> str:
    """`node/tier/exit` of each span, in order (`edge-0/edge/12, cloud-0/cloud/20`)."""
    return ", ".join(f"{s.node}/{TIER.name(s.tier)}/{s.exit}" for s in spans)


def route_headers(spans: list[pb.RouteSpan] | list[pb.Source], difficulty: float) -> dict[str, str]:
    return {"x-ruyiflow-route": route_header(spans), "x-ruyiflow-difficulty": f"{difficulty:.4f}"}


class AnswerWriter:
    """One request's answer, fed the router's chunks in order with `add`. `model_of` names the
    model a node serves (the answer's `model` is the first serving node's)."""

    def __init__(self, spec: AnswerSpec, model_of: Callable[[str], str], created: int) -> None:
        self.spec = spec
        self.id = ("chatcmpl-" if spec.kind == "chat" else "cmpl-") + spec.request_id
        self.created = created
        self._model_of = model_of
        self.model = ""
        self.text = ""
        self.num_tokens = 0
        self.num_prompt_tokens = 0
        self.finish_reason: str | None = None
        self.route = pb.RouteTrace()  # the router's trace, from the final chunk
        self.trace: dict[str, object] | None = None  # the same as JSON (`ruyiflow`)
        self._chat_logprobs: list[TokenLogprob] = []
        self._text_logprobs = CompletionLogprobs(top_logprobs=[] if spec.logprobs else None)

    # -- reading chunks ------------------------------------------------------------------------
    def add(self, chunk: pb.Chunk) -> None:
        if not self.model and chunk.source.node:
            self.model = self._model_of(chunk.source.node)
        if not self.num_prompt_tokens:
            self.num_prompt_tokens = chunk.num_prompt_tokens  # the first node's count
        if self.spec.logprobs is not None:
            self._add_logprobs(chunk)
        self.text += chunk.text
        self.num_tokens += len(chunk.token_ids)
        if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = FINISH.get(chunk.finish_reason, "stop")
            self.route = chunk.trace
            self.trace = {"request_id": self.spec.request_id, **trace_to_dict(chunk.trace)}

    def _add_logprobs(self, chunk: pb.Chunk) -> None:
        """One entry per token; a chunk's text goes with its last token (nodes send one token
        per chunk, so this only matters for a future batching node)."""
        num = len(chunk.token_ids)
        for k, confidence in enumerate(chunk.confidence[:num]):
            text = chunk.text if k == num - 1 else ""
            logprob = math.log(max(confidence.max_prob, 1e-45))
            top = TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))
            alternatives = [top] if self.spec.logprobs else []
            self._chat_logprobs.append(TokenLogprob(**top.model_dump(), top_logprobs=alternatives))
            lp = self._text_logprobs
            lp.text_offset.append(len(self.text))
            lp.tokens.append(text)
            lp.token_logprobs.append(logprob)
            if lp.top_logprobs is not None:
                lp.top_logprobs.append({text: logprob})

    def usage(self) -> Usage:
        total = self.num_prompt_tokens + self.num_tokens
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_tokens,
            total_tokens=total,
        )

    # -- a whole answer ------------------------------------------------------------------------
    def whole(self) -> ChatCompletion | Completion:
        if self.spec.kind == "chat":
            logprobs = None
            if self.spec.logprobs is not None:
                logprobs = ChoiceLogprobs(content=self._chat_logprobs)
            choice = ChatChoice(
                message=AssistantMessage(content=self.text),
                logprobs=logprobs,
                finish_reason=self.finish_reason,
            )
            return ChatCompletion(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[choice],
                usage=self.usage(),
                ruyiflow=self.trace,
            )
        text_logprobs = self._text_logprobs if self.spec.logprobs is not None else None
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[
                CompletionChoice(
                    text=self.text, logprobs=text_logprobs, finish_reason=self.finish_reason
                )
            ],
            usage=self.usage(),
            ruyiflow=self.trace,
        )

    # -- a stream ------------------------------------------------------------------------------
    def stream_start(self) -> bytes:
        """The chat role chunk (completions have none); call after the first `add`."""
        if self.spec.kind != "chat":
            return b""
        delta = ChatDelta(role="assistant", content="")
        return sse(self._chat_chunk([ChatChunkChoice(delta=delta)]))

    def stream_chunk(self, chunk: pb.Chunk) -> bytes:
        """The event for a chunk already `add`ed (empty when it adds nothing the client sees)."""
        is_final = chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        wants_logprobs = self.spec.logprobs is not None and len(chunk.token_ids) > 0
        if not (chunk.text or is_final or wants_logprobs):
            return b""  # a token whose text waits for the next (half a UTF-8 character)
        finish = self.finish_reason if is_final else None
        trace = self.trace if is_final else None
        num = len(chunk.token_ids)
        if self.spec.kind == "chat":
            logprobs = None
            if wants_logprobs:
                logprobs = ChoiceLogprobs(content=self._chat_logprobs[-num:])
            choice = ChatChunkChoice(
                delta=ChatDelta(content=chunk.text), logprobs=logprobs, finish_reason=finish
            )
            return sse(self._chat_chunk([choice], ruyiflow=trace))
        text_logprobs = None
        if wants_logprobs:
            lp = self._text_logprobs
            text_logprobs = CompletionLogprobs(
                tokens=lp.tokens[-num:],
                token_logprobs=lp.token_logprobs[-num:],
                top_logprobs=None if lp.top_logprobs is None else lp.top_logprobs[-num:],
                text_offset=lp.text_offset[-num:],
            )
        choice = CompletionChoice(text=chunk.text, logprobs=text_logprobs, finish_reason=finish)
        return sse(self._text_chunk([choice], ruyiflow=trace))

    def stream_end(self) -> bytes:
        """The usage chunk (with `include_usage`: empty choices), then `[DONE]`."""
        if not self.spec.include_usage:
            return DONE
        if self.spec.kind == "chat":
            return sse(self._chat_chunk([], usage=self.usage())) + DONE
        return sse(self._text_chunk([], usage=self.usage())) + DONE

    def _chat_chunk(self, choices: list[ChatChunkChoice], **extra: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )

    def _text_chunk(self, choices: list[CompletionChoice], **extra: object) -> Completion:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )
