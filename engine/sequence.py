"""A running request: its tokens, exit, KV cache, sampling state and streamed text
(torch-free: the cache and random generator come from the engine that owns it).

Invariant while running: the cache holds every token but the last (`cache.length ==
len(token_ids) - 1`); the last token is fed at the next step. A waiting sequence has fewer
cached positions and is (re)filled by prefill chunks first.
"""

from __future__ import annotations

from typing import Any

from ruyiflow.engine.events import Confidence, Status, TokenEvent  # noqa: F401 (re-exported)
from ruyiflow.engine.ngrams import NgramIndex
from ruyiflow.engine.sampling_params import SamplingParams


class Sequence:
    def __init__(
        self,
        seq_id: str,
        token_ids: list[int],
        num_prompt_tokens: int,
        exit_layer: int,
        params: SamplingParams,
        cache: Any,  # engine.kv_cache.SequenceCache, or the ONNX Runtime engine's cache
        stream,  # engine.tokenizer.StreamDecoder
        stop_ids: frozenset[int],
        generator: Any,  # the backend's random generator, seeded with `seed`
        seed: int,
    ):
        self.id = seq_id
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = num_prompt_tokens
        self.exit = exit_layer
        self.params = params
        self.cache = cache
        self.status = Status.WAITING
        self.finish_reason: str | None = None
        self.generator, self.seed = generator, seed
        self.stop_ids = stop_ids
        self.stream = stream
        self.text = ""  # generated text so far (after stop-string truncation)
        self.num_emitted_chars = 0
        self.ngrams = (
            NgramIndex(params.no_repeat_ngram_size) if params.no_repeat_ngram_size else None
        )
        if self.ngrams:
            self.ngrams.add_all(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def pending_tokens(self) -> list[int]:
        """Tokens not yet in the cache."""
        return self.token_ids[self.cache.length :]

    def append(self, token_id: int) -> str:
        """Record a sampled token; returns the text released to the client for it."""
        self.token_ids.append(token_id)
        if self.ngrams:
            self.ngrams.add_last(self.token_ids)
        if token_id in self.stop_ids:
            return self.finish("stop")
        self.text += self.stream.push(token_id)
        for stop in self.params.stop:
            idx = self.text.find(stop, max(0, self.num_emitted_chars - len(stop)))
            if idx >= 0:
                self.text = self.text[:idx]
                self.finish_reason = "stop"
                return self._take(len(self.text))
        # Hold back the tail that could still become a stop string.
        hold = max((len(s) - 1 for s in self.params.stop), default=0)
        return self._take(len(self.text) - hold)

    def finish(self, reason: str) -> str:
        """Mark finished (first reason wins); returns the text still held back."""
        if self.finish_reason is None:
            self.finish_reason = reason
            self.text += self.stream.flush()
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(self.num_emitted_chars, end)
        out = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        return out
