"""Per-request sampling: parameters, logits processors and the draw itself.

Order follows Hugging Face `generate`: repetition penalty, no-repeat-ngram ban, temperature,
top-k, top-p, then a multinomial draw from the request's own `torch.Generator`, so the same seed
gives the same tokens whatever else shares the batch. Temperature 0 means greedy.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from engine.errors import InvalidRequest

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 < self.repetition_penalty <= 100.0, "repetition_penalty must be in (0, 100]"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            (all(self.stop), "stop strings must not be empty"),
            (self.seed is None or 0 <= self.seed < 2**63, "seed must be in [0, 2**63)"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_row_processing(self) -> bool:
        return not self.is_greedy or self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"], d["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise InvalidRequest(f"unknown sampling fields {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise InvalidRequest(f"bad sampling parameters: {exc}") from exc


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A private CPU generator; an unseeded request draws a seed (recorded for handoff)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen, seed


@dataclass
class NgramIndex:
    """Seen n-grams as prefix -> next tokens, updated per token (no rescans of the history)."""

    size: int
    seen: dict[tuple[int, ...], set[int]] = field(default_factory=dict)

    def add_all(self, tokens: list[int]) -> None:
        for end in range(self.size, len(tokens) + 1):
            self._add(tokens[end - self.size : end])

    def add_last(self, tokens: list[int]) -> None:
        if len(tokens) >= self.size:
            self._add(tokens[-self.size :])

    def _add(self, gram: list[int]) -> None:
        self.seen.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def banned(self, tokens: list[int]) -> set[int]:
        if len(tokens) < self.size - 1:
            return set()
        prefix = tuple(tokens[len(tokens) - self.size + 1 :]) if self.size > 1 else ()
        return self.seen.get(prefix, set())


def process_row(
    logits: torch.Tensor, params: SamplingParams, tokens: list[int], ngrams: NgramIndex | None
) -> torch.Tensor:
    """logits [V] float32 -> processed logits [V] (a new tensor)."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0 and tokens:
        ids = torch.tensor(sorted(set(tokens)), dtype=torch.long)
        picked = logits[ids]
        picked = torch.where(
            picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty
        )
        logits[ids] = picked
    if ngrams is not None:
        banned = ngrams.banned(tokens)
        if banned:
            logits[torch.tensor(sorted(banned), dtype=torch.long)] = float("-inf")
    if params.is_greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False  # always keep the most likely token
        logits = logits.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
    return logits


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from processed logits [V]."""
    if params.is_greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
