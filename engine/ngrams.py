"""No-repeat-ngram bookkeeping (torch-free, shared by the torch and ONNX Runtime engines)."""

from __future__ import annotations

from dataclasses import dataclass, field


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
