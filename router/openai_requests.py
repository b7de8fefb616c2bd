"""OpenAI requests -> the router's `GenerateRequest`, plus what the answer must look like.

Only translation and refusal live here: every field is either carried over to the proto or
refused with a 400 naming it - nothing is dropped silently. A field we do not implement is still
accepted at its neutral value (`"presence_penalty": 0`, `"tools": []`, null), since many clients
send those by default. Range and size checks beyond the wire format stay in `router.requests`,
shared with gRPC clients.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

from ruyiflow.cluster.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    RuyiflowOptions,
    SamplingRequest,
)
from ruyiflow.cluster.router_spec import HANDOFF_MODES
from ruyiflow.cluster.topology import TIERS, Topology
from ruyiflow.cluster.wire import HANDOFF_MODE, TIER
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.openai_errors import ApiError, invalid
from ruyiflow.router.requests import MAX_PROMPT_BYTES, MAX_PROMPT_TOKEN_IDS

AUTO_MODEL = "auto"
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "seed",
)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Fields we do not implement, at the value that changes nothing (None is neutral for all).
NEUTRAL: dict[str, Any] = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "tools": [],
    "functions": [],
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "response_format": {"type": "text"},
    "best_of": 1,
    "suffix": "",
    "store": False,
}


@dataclass(frozen=True)
class AnswerSpec:
    """How the answer to one request is written."""

    kind: str  # chat | completion
    request_id: str
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: off; else how many top alternatives per token (0 or 1)


def _refuse_extras(extra: dict[str, Any] | None, prefix: str = "") -> None:
    for key, value in (extra or {}).items():
        if value is None or (key in NEUTRAL and value == NEUTRAL[key]):
            continue
        raise invalid(f"{prefix}{key} is not supported by ruyiflow", f"{prefix}{key}")


def _routed_model(model: str, options: RuyiflowOptions | None, topology: Topology) -> None:
    """`model` must be `auto` or a topology model; a model the thresholds do not route to is
    reached by pinning one of its nodes (`ruyiflow.node`)."""
    if model in (AUTO_MODEL, topology.routed_model):
        return
    names = [m.name for m in topology.models]
    if model not in names:
        choices = ", ".join([AUTO_MODEL, *names])
        message = f"The model `{model}` does not exist; models: {choices}"
        raise ApiError(404, message, "model", "model_not_found")
    node = options.node if options is not None else None
    if node is None:
        raise invalid(
            f"model {model!r} is served only where routing sends it; ask for "
            f"{topology.routed_model!r} or {AUTO_MODEL!r}, or pin one of its nodes with "
            "ruyiflow.node",
            "model",
        )
    if node in {n.name for n in topology.nodes} and topology.node(node).model != model:
        raise invalid(f"node {node!r} does not serve model {model!r}", "ruyiflow.node")


def _set(message: Any, field: str, value: Any, param: str) -> None:
    """Set a proto field; a value its type cannot hold (a uint32 over 2**32) is the client's."""
    try:
        setattr(message, field, value)
    except (ValueError, TypeError):
        raise invalid(f"{param} is out of range", param) from None


def _sampling(body: SamplingRequest, max_tokens: int | None, param: str) -> pb.SamplingParams:
    s = pb.SamplingParams()
    if max_tokens is not None:
        _set(s, "max_tokens", max_tokens, param)
    if body.top_k is not None and body.top_k > 0:
        _set(s, "top_k", body.top_k, "top_k")
    for name in SAMPLING_FIELDS:
        value = getattr(body, name)
        if value is not None:
            _set(s, name, value, name)
    if s.HasField("seed") and s.seed >= 2**63:
        raise invalid("seed must be in [0, 2**63)", "seed")
    s.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop or [])
    return s


def _overrides(options: RuyiflowOptions | None, request: pb.GenerateRequest) -> None:
    if options is None:
        return
    if options.exit is not None:
        _set(request.overrides, "exit", options.exit, "ruyiflow.exit")
    if options.tier is not None:
        if options.tier not in TIERS:
            raise invalid(f"tier must be one of {', '.join(TIERS)}", "ruyiflow.tier")
        request.overrides.tier = TIER.value(options.tier)
    if options.node is not None:
        request.overrides.node = options.node
    if options.handoff_mode is not None:
        if options.handoff_mode not in HANDOFF_MODES:
            message = f"handoff_mode must be one of {', '.join(HANDOFF_MODES)}"
            raise invalid(message, "ruyiflow.handoff_mode")
        request.overrides.handoff_mode = HANDOFF_MODE.value(options.handoff_mode)
    if options.escalation is not None:
        for key, value in options.escalation.model_dump(exclude_none=True).items():
            _set(request.escalation, key, value, f"ruyiflow.escalation.{key}")


def _common(
    body: SamplingRequest, kind: str, max_tokens: int | None, topology: Topology
) -> tuple[pb.GenerateRequest, AnswerSpec]:
    """The request fields both endpoints share (logprobs are set by the caller)."""
    _refuse_extras(body.model_extra)
    _routed_model(body.model, body.ruyiflow, topology)
    if body.n not in (None, 1):
        raise invalid("n must be 1: ruyiflow generates one choice per request", "n")
    include_usage = False
    if body.stream_options is not None:
        if not body.stream:
            message = "stream_options is only allowed when stream is true"
            raise invalid(message, "stream_options")
        _refuse_extras(body.stream_options.model_extra, "stream_options.")
        include_usage = bool(body.stream_options.include_usage)
    request = pb.GenerateRequest(request_id=uuid.uuid4().hex)
    uses_completion_tokens = getattr(body, "max_completion_tokens", None) is not None
    param = "max_completion_tokens" if uses_completion_tokens else "max_tokens"
    request.sampling.CopyFrom(_sampling(body, max_tokens, param))
    _overrides(body.ruyiflow, request)
    spec = AnswerSpec(kind, request.request_id, bool(body.stream), include_usage, None)
    return request, spec


def _check_logprobs(
    sampling: pb.SamplingParams, param: str, top: int | None, top_param: str
) -> None:
    """Nodes report each token's (max_prob, margin, entropy) under its exit's distribution:
    ln(max_prob) is the chosen token's log-probability exactly when the token is that
    distribution's argmax - greedy decoding with no penalty reshaping the logits."""
    processed = (sampling.HasField("temperature") and sampling.temperature > 0) or (
        (sampling.HasField("repetition_penalty") and sampling.repetition_penalty != 1.0)
        or sampling.no_repeat_ngram_size > 0
    )
    if processed:
        raise invalid(
            f"{param} needs greedy decoding (temperature 0, no repetition_penalty or "
            "no_repeat_ngram_size): nodes measure the most likely token's probability, which is "
            "the chosen token's only then",
            param,
        )
    if top is not None and top > 1:
        message = "top_logprobs above 1 are not measured: nodes report only the top token"
        raise invalid(message, top_param)


def _max_tokens(body: ChatCompletionRequest) -> int | None:
    if body.max_completion_tokens is None:
        return body.max_tokens
    if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
        message = "max_tokens and max_completion_tokens disagree; set one"
        raise invalid(message, "max_completion_tokens")
    return body.max_completion_tokens


def chat_request(
    body: ChatCompletionRequest, topology: Topology
) -> tuple[pb.GenerateRequest, AnswerSpec]:
    """`/v1/chat/completions` -> a conversation request."""
    request, spec = _common(body, "chat", _max_tokens(body), topology)
    num_bytes = 0
    for i, message in enumerate(body.messages):
        _refuse_extras(message.model_extra, f"messages[{i}].")
        if message.name is not None:
            raise invalid("message names are not supported", f"messages[{i}].name")
        role = ROLES.get(message.role)
        if role is None:
            roles = ", ".join(ROLES)
            raise invalid(f"role must be one of {roles}", f"messages[{i}].role")
        text = _message_text(message.content, f"messages[{i}].content")
        num_bytes += len(text.encode())
        request.conversation.messages.add(role=role, content=text)
    if num_bytes > MAX_PROMPT_BYTES:
        message = f"messages hold {num_bytes} bytes of text, limit {MAX_PROMPT_BYTES}"
        raise ApiError(413, message, "messages", "request_too_large")
    for key, value in (body.chat_template_kwargs or {}).items():
        if key != "enable_thinking" or not isinstance(value, bool):
            message = "only enable_thinking (a boolean) is supported"
            raise invalid(message, f"chat_template_kwargs.{key}")
        request.enable_thinking = value
    logprobs = None
    if body.logprobs:
        _check_logprobs(request.sampling, "logprobs", body.top_logprobs, "top_logprobs")
        logprobs = body.top_logprobs or 0
    elif body.top_logprobs:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    return request, dataclasses.replace(spec, logprobs=logprobs)


def _message_text(content: Any, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise invalid("only text content parts are supported", f"{param}[{j}].type")
        _refuse_extras(part.model_extra, f"{param}[{j}].")
        texts.append(part.text)
    return "\n".join(texts)


def completion_request(
    body: CompletionRequest, topology: Topology
) -> tuple[pb.GenerateRequest, AnswerSpec]:
    """`/v1/completions` -> a text prompt (no chat template) or a token-id prompt."""
    request, spec = _common(body, "completion", body.max_tokens, topology)
    if body.echo:
        raise invalid("echo is not supported", "echo")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise invalid("one prompt per request: ruyiflow does not batch prompts", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if len(prompt.encode()) > MAX_PROMPT_BYTES:
            message = f"prompt holds {len(prompt.encode())} bytes, limit {MAX_PROMPT_BYTES}"
            raise ApiError(413, message, "prompt", "request_too_large")
        request.text = prompt
    else:
        if len(prompt) > MAX_PROMPT_TOKEN_IDS:
            message = f"prompt holds {len(prompt)} token ids, limit {MAX_PROMPT_TOKEN_IDS}"
            raise ApiError(413, message, "prompt", "request_too_large")
        if any(not 0 <= t < 2**32 for t in prompt):
            raise invalid("token ids must be in [0, 2**32)", "prompt")
        request.token_ids.ids.extend(prompt)
    logprobs = None
    if body.logprobs is not None:
        _check_logprobs(request.sampling, "logprobs", body.logprobs, "logprobs")
        logprobs = body.logprobs
    return request, dataclasses.replace(spec, logprobs=logprobs)
