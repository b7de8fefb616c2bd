"""What one engine step asks a model runner to compute (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Work:
    """Tokens of one sequence to push through the model at one exit: a prefill chunk (many
    tokens) or a decode row (the one token sampled last)."""

    cache: Any  # the runner's per-sequence cache
    token_ids: list[int]
    start: int  # position of token_ids[0]; the cache holds `start` valid positions
    exit: int
    want_logits: bool = True  # logits of the last token
