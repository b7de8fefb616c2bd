"""What an engine turns out to accept, learnt once it answers (and again after each outage):
token-id prompts, logprobs, ids inside logprobs, and a rough prefill speed. Facts learnt at
run time are returned, never written into the topology.

Token-id prompts are used only when the engine takes them and reads them as our tokenizer
does: the probe's greedy next token must be the same for the ids and for their text. An engine
that refuses ids (llama.cpp's server takes text only) gets the chat-templated text, and one
whose next token differs is taken to tokenize otherwise (text prompts too, with a warning).
A node without a tokenizer sends text only: its probe asks for text, and the prefill speed
counts the prompt tokens the engine's `usage` reports (0 when it reports none).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ruyiflow.cloud_node.engine_client import EngineClient, EngineUnreachable
from ruyiflow.cloud_node.token_stream import TOKEN_ID_PREFIX
from ruyiflow.cluster.errors import InvalidRequest, RuyiflowError
from ruyiflow.cluster.openai_types import Completion, CompletionRequest
from ruyiflow.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. " * 8  # ~80 tokens for most BPEs
LOGPROB_TOP = 2


@dataclass(frozen=True)
class EngineDialect:
    accepts_token_ids: bool
    has_logprobs: bool
    ids_in_logprobs: bool  # vLLM's return_tokens_as_token_ids was honoured
    prefill_tokens_per_s: float

    def describe(self) -> str:
        return (
            f"prompts as {'token ids' if self.accepts_token_ids else 'text'}, "
            f"logprobs {'yes' if self.has_logprobs else 'no (never escalates)'}, "
            f"token ids in logprobs {'yes' if self.ids_in_logprobs else 'no'}"
        )


def _first_token(answer: Completion) -> tuple[str, str]:
    """(first logprobs token or '', text) of a one-token answer."""
    choice = answer.choices[0] if answer.choices else None
    if choice is None:
        return "", ""
    tokens = choice.logprobs.tokens if choice.logprobs is not None else []
    return (tokens[0] if tokens else ""), choice.text


async def probe_engine(
    client: EngineClient, model: str, tokenizer: Tokenizer | None
) -> EngineDialect:
    ids = tokenizer.encode(PROBE_TEXT) if tokenizer is not None else None
    text = tokenizer.decode(ids) if tokenizer is not None else PROBE_TEXT

    def ask(prompt: str | list[int], logprobs: bool) -> CompletionRequest:
        extra = {"return_tokens_as_token_ids": True} if logprobs else {}
        return CompletionRequest(
            model=model,
            prompt=prompt,
            max_tokens=1,
            temperature=0.0,
            logprobs=LOGPROB_TOP if logprobs else None,
            **extra,
        )

    started = time.perf_counter()
    by_ids = None
    try:
        if ids is not None:
            by_ids = await client.complete(ask(ids, logprobs=True))
    except EngineUnreachable:
        raise
    except RuyiflowError as exc:  # llama.cpp's server answers a list prompt with HTTP 500
        log.info("engine at %s takes no token-id prompts (%s)", client.where, exc)
    elapsed = time.perf_counter() - started
    started = time.perf_counter()
    try:
        by_text = await client.complete(ask(text, logprobs=True))
        has_logprobs = _first_token(by_text)[0] != ""
    except InvalidRequest as exc:
        log.info("engine at %s returns no logprobs (%s)", client.where, exc)
        by_text = await client.complete(ask(text, logprobs=False))
        has_logprobs = False
    if by_ids is None:
        elapsed = time.perf_counter() - started
    accepts_ids = by_ids is not None
    if by_ids is not None and _first_token(by_ids)[1] != _first_token(by_text)[1]:
        log.warning(
            "engine at %s continues our token ids and their text differently: its tokenizer "
            "is not ours (set the node's `tokenizer`); sending text prompts",
            client.where,
        )
        accepts_ids = False
    first = _first_token(by_ids if by_ids is not None else by_text)[0]
    return EngineDialect(
        accepts_token_ids=accepts_ids,
        has_logprobs=has_logprobs,
        ids_in_logprobs=first.startswith(TOKEN_ID_PREFIX),
        prefill_tokens_per_s=_num_prompt_tokens(ids, by_text) / elapsed if elapsed > 0 else 0.0,
    )


def _num_prompt_tokens(ids: list[int] | None, answer: Completion) -> int:
    """The probe prompt's length: our count, else the engine's `usage` (one token decoded too)."""
    if ids is not None:
        return len(ids)
    return answer.usage.prompt_tokens if answer.usage is not None else 0
