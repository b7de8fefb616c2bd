"""Difficulty scorers: a conversation → a score in [0, 1] (0 = trivial, 1 = very hard).

The `Scorer` interface, the text measures every scorer shares, and the v1 heuristic. Scorers are
built by name with `ruyiflow.router.scorers.make_scorer` (the learned one lives in
`learned_scorer`, on the features of `features`, which build on the measures here).

`HeuristicScorer` (v1) measures six features of the whole conversation, each in [0, 1]:

| feature   | measure                                                      | weight |
|-----------|--------------------------------------------------------------|--------|
| reasoning | distinct reasoning cues matched (why, prove, step by step…)  | 0.60   |
| maths     | distinct maths cues (digit-operator-digit, integral, solve…) | 0.55   |
| code      | distinct code cues (fences, def/class, tracebacks, SQL…)     | 0.55   |
| length    | log2 of approximate tokens, 0 at ≤ 16 tokens, 1 at ≥ 4096    | 0.35   |
| thinking  | 1 when thinking mode is requested                            | 0.30   |
| depth     | user turns beyond the first, saturating at 6                 | 0.20   |

A cue feature with k distinct cues matched is 1 - 2^-k (1 cue: 0.5, 2: 0.75, 3: 0.875).
Features combine as a noisy-OR, `1 - Π(1 - weight × feature)`: the score is deterministic, stays
in [0, 1], and never decreases when a cue, a word or a turn is added.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from typing import Any

WEIGHTS = {
    "reasoning": 0.60,
    "maths": 0.55,
    "code": 0.55,
    "length": 0.35,
    "thinking": 0.30,
    "depth": 0.20,
}


def _cues(*patterns: str) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.IGNORECASE | re.MULTILINE) for p in patterns)


REASONING_CUES = _cues(
    r"\bwhy\b",
    r"\bprove\b|\bproof\b|\bshow that\b",
    r"\bstep[- ]by[- ]step\b",
    r"\bexplain\b|\bexplanation\b",
    r"\bcompare\b|\bcontrast\b|\bdifferences? between\b",
    r"\bjustify\b|\bargue\b|\bargument\b",
    r"\bderive\b|\bderivation\b",
    r"\banaly[sz]e\b|\banalysis\b",
    r"\breason(?:ing)?\b|\btrade-?offs?\b|\bpros and cons\b",
    r"\bwhat if\b|\bhypothes[ie]s\b|\bcounterexample\b",
)
MATHS_CUES = _cues(
    r"\d\s*[-+*/^×÷]\s*\d|\w\s*\^\s*\d",
    r"\w\s*=\s*[\w(]",
    r"\b(?:calculate|compute|evaluate)\b",
    r"\b(?:solve|equation|inequality)\b",
    r"\b(?:integral|integrate|derivative|differentiate|limit)\b|[∫∑∂√∞]",
    r"\b(?:prime|primes|divisible|modulo|gcd|factori[sz]e)\b",
    r"\b(?:theorem|lemma|corollary|induction)\b",
    r"\b(?:matrix|matrices|eigen\w*|vector|determinant)\b",
    r"\b(?:probability|expected value|variance|combinatorics)\b",
    r"\\(?:frac|int|sum|sqrt)\b|\$[^$\n]{1,200}\$",
)
CODE_CUES = _cues(
    r"```",
    r"\bdef\s+\w+\s*\(|\bclass\s+\w+|\bfunction\b|\blambda\b",
    r"Traceback \(most recent call last\)|\b\w+(?:Error|Exception):",
    r"\bselect\b[^;]{1,200}?\bfrom\b|\binsert into\b|\bcreate table\b",
    r"\b(?:python|javascript|typescript|rust|golang|java|c\+\+|sql|bash)\b",
    r"\b(?:code|script|program|implement|algorithm|regex|compile|debug|refactor)\b",
    r"#include\b|\bimport \w+|=>|::|\{[ \t]*$",
)
LENGTH_FLOOR_TOKENS = 16
LENGTH_CEIL_TOKENS = 4096
DEPTH_SATURATION_TURNS = 6


class Scorer(ABC):
    """Maps a conversation (`[{"role": ..., "content": ...}, ...]`) to difficulty in [0, 1]."""

    @abstractmethod
    def score(self, messages: list[dict[str, Any]], enable_thinking: bool | None = None) -> float:
        """Difficulty of answering the conversation's last turn, in [0, 1]."""


def message_text(message: dict[str, Any]) -> str:
    """Text of one message; `content` may be a string or a list of {"type": "text"} parts."""
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))


def approx_tokens(text: str) -> float:
    """Token count estimate without a tokenizer: the larger of 4/3 per word and 1 per 4 chars."""
    return max(len(text.split()) * 4 / 3, len(text) / 4)


def length_feature(num_tokens: float) -> float:
    """Length in [0, 1]: log2 of tokens, 0 at <= 16 tokens, 1 at >= 4096."""
    span = math.log2(LENGTH_CEIL_TOKENS / LENGTH_FLOOR_TOKENS)
    ratio = max(num_tokens, LENGTH_FLOOR_TOKENS) / LENGTH_FLOOR_TOKENS
    return min(1.0, math.log2(ratio) / span)


def count_cues(text: str, cues: tuple[re.Pattern[str], ...]) -> int:
    """How many distinct cue patterns occur in `text` (repeats of one cue count once)."""
    return sum(1 for cue in cues if cue.search(text))


class HeuristicScorer(Scorer):
    """Cue- and length-based difficulty (module docstring has the features and weights)."""

    def features(
        self, messages: list[dict[str, Any]], enable_thinking: bool | None = None
    ) -> dict[str, float]:
        """Each feature in [0, 1], keyed as in `WEIGHTS` (exposed for logging and tuning)."""
        text = "\n".join(message_text(m) for m in messages)
        num_user_turns = sum(1 for m in messages if m.get("role", "user") == "user")
        return {
            "reasoning": 1 - 0.5 ** count_cues(text, REASONING_CUES),
            "maths": 1 - 0.5 ** count_cues(text, MATHS_CUES),
            "code": 1 - 0.5 ** count_cues(text, CODE_CUES),
            "length": length_feature(approx_tokens(text)),
            "thinking": 1.0 if enable_thinking else 0.0,
            "depth": min(1.0, max(0, num_user_turns - 1) / DEPTH_SATURATION_TURNS),
        }

    def score(self, messages: list[dict[str, Any]], enable_thinking: bool | None = None) -> float:
        features = self.features(messages, enable_thinking)
        easiness = math.prod(1 - WEIGHTS[name] * value for name, value in features.items())
        return min(1.0, max(0.0, 1 - easiness))
