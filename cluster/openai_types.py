"""OpenAI-compatible wire types (chat completions, completions, models, errors), written once:
the router's HTTP front end parses requests and writes answers with them, and a node backed by
an OpenAI-compatible engine (vLLM, llama.cpp) can send requests and read answers with the same
classes. Pydantic models only: torch-free, no router imports.

Every model keeps the fields it does not declare (`model_extra`), so a server can refuse what it
cannot honour by name instead of dropping it, and a client reading another server's answers
keeps that server's additions. Optional answer fields that OpenAI leaves out when unset (usage on
stream chunks, a delta's role, ruyiflow's route) are omitted from the JSON when None.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


def _is_none(value: object) -> bool:
    return value is None


def omitted_when_none(**kwargs: Any) -> Any:
    """A field that defaults to None and is left out of the JSON while None."""
    return Field(default=None, exclude_if=_is_none, **kwargs)


class WireModel(BaseModel):
    """Base of every wire type: keeps undeclared fields (see the module docstring)."""

    model_config = ConfigDict(extra="allow")


# -- requests ---------------------------------------------------------------------------------


class ContentPart(WireModel):
    """One part of a message's content; only `{"type": "text", "text": ...}` is plain text."""

    type: str
    text: str | None = None


class ChatMessage(WireModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = omitted_when_none()


class StreamOptions(WireModel):
    include_usage: bool | None = None


class EscalationOptions(WireModel):
    """ruyiflow's per-request escalation settings (proto `EscalationSettings`)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    window: int | None = Field(default=None, ge=1)
    threshold: float | None = Field(default=None, gt=0, lt=1)
    force_after_tokens: int | None = Field(default=None, ge=0)
    force_to_exit: int | None = None


class RuyiflowOptions(WireModel):
    """ruyiflow's routing overrides (proto `Overrides`), sent as `extra_body={"ruyiflow": ...}`."""

    model_config = ConfigDict(extra="forbid")

    exit: int | None = None
    tier: str | None = None
    node: str | None = None
    handoff_mode: str | None = None
    escalation: EscalationOptions | None = None


class SamplingRequest(WireModel):
    """Fields both completion endpoints share, with the vLLM-style extras (`extra_body`)."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    top_k: int | None = Field(default=None, ge=-1)  # -1 and 0 turn it off (vLLM: -1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    no_repeat_ngram_size: int | None = Field(default=None, ge=0)
    ruyiflow: RuyiflowOptions | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None


# -- answers ----------------------------------------------------------------------------------


class Usage(WireModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(WireModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(WireModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(WireModel):
    role: str = "assistant"
    content: str | None = None


class ChatChoice(WireModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletion(WireModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = omitted_when_none()
    ruyiflow: dict[str, Any] | None = omitted_when_none()


class ChatDelta(WireModel):
    role: str | None = omitted_when_none()
    content: str | None = omitted_when_none()


class ChatChunkChoice(WireModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(WireModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = omitted_when_none()
    ruyiflow: dict[str, Any] | None = omitted_when_none()


class CompletionLogprobs(WireModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(WireModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(WireModel):
    """A `/v1/completions` answer, whole or (streamed) one chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = omitted_when_none()
    ruyiflow: dict[str, Any] | None = omitted_when_none()


class ModelCard(WireModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ruyiflow"
    max_model_len: int | None = omitted_when_none()


class ModelList(WireModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(WireModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(WireModel):
    error: ErrorDetail
