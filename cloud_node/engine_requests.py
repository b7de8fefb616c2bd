"""The HTTP bodies a `backend: openai` node sends for one request.

With a local tokenizer: `/v1/completions` with the chat-templated prompt (token ids when the
engine takes them). Without one (`cloud_node.text_prompts`): a conversation goes to
`/v1/chat/completions`, where the engine applies its own template, and a plain prompt to
`/v1/completions` as text; both ask for `usage` (`stream_options.include_usage`), since the
node cannot count tokens itself. Text already generated elsewhere (a failover or a move into
this node) continues a plain prompt by concatenation and a conversation as the assistant's
unfinished last message (`continue_final_message`, vLLM's and SGLang's extension; an engine
without it starts a new assistant turn).
"""

from __future__ import annotations

from typing import Any

from ruyiflow.cloud_node.engine_probe import LOGPROB_TOP, EngineDialect
from ruyiflow.cloud_node.text_prompts import ChatPrompt
from ruyiflow.cluster.openai_types import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    StreamOptions,
)
from ruyiflow.engine.sampling_params import SamplingParams


def _sampling(
    model: str, p: SamplingParams, max_tokens: int, dialect: EngineDialect
) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        model=model,
        max_tokens=max(1, max_tokens),
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty,
        repeat_penalty=p.repetition_penalty,  # llama.cpp's name for it
        stop=list(p.stop) or None,
        seed=p.seed,
        stream=True,
    )
    if dialect.ids_in_logprobs:
        fields["return_tokens_as_token_ids"] = True
    return fields


def completion_request(
    model: str,
    prompt: str | list[int],
    p: SamplingParams,
    max_tokens: int,
    dialect: EngineDialect,
    with_usage: bool = False,
) -> CompletionRequest:
    return CompletionRequest(
        prompt=prompt,
        logprobs=LOGPROB_TOP if dialect.has_logprobs else None,
        stream_options=StreamOptions(include_usage=True) if with_usage else None,
        **_sampling(model, p, max_tokens, dialect),
    )


def chat_request(
    model: str,
    chat: ChatPrompt,
    prefix: str,
    p: SamplingParams,
    max_tokens: int,
    dialect: EngineDialect,
) -> ChatCompletionRequest:
    messages = [ChatMessage(**m) for m in chat.messages]
    extra: dict[str, Any] = {}
    if prefix:
        messages.append(ChatMessage(role="assistant", content=prefix))
        extra = {"continue_final_message": True, "add_generation_prompt": False}
    kwargs = None if chat.enable_thinking is None else {"enable_thinking": chat.enable_thinking}
    return ChatCompletionRequest(
        messages=messages,
        logprobs=True if dialect.has_logprobs else None,
        top_logprobs=LOGPROB_TOP if dialect.has_logprobs else None,
        stream_options=StreamOptions(include_usage=True),
        chat_template_kwargs=kwargs,
        **_sampling(model, p, max_tokens, dialect),
        **extra,
    )
