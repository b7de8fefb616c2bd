"""What an engine step yields (torch-free: the serving layer and ONNX Runtime nodes use it)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class Confidence:
    """The branch's own distribution at this token (before any sampling processor)."""

    max_prob: float
    margin: float  # p1 - p2
    entropy: float  # nats


@dataclass(frozen=True)
class TokenEvent:
    seq_id: str
    token_id: int
    text: str  # newly releasable text (stop strings held back until resolved)
    exit: int
    confidence: Confidence
    finish_reason: str | None = None  # "stop" | "length" | "abort"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
