"""Sampling parameters of one request (torch-free: the router and ONNX Runtime edge nodes
import them without PyTorch). The logits processors and the draw live in `engine.sampling`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ruyiflow.engine.errors import InvalidRequest

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
    min_p: float = 0.0  # 0 = off; keeps p >= min_p * max p (after top-k/top-p)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (0.0 <= self.temperature <= 100.0, "temperature must be in [0, 100]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
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
