"""Difficulty features of a conversation, shared by the learned scorer's training and serving.

Torch-free (numpy only) and deterministic across processes (crc32 and a fixed multiplicative
hash, never Python's salted `hash`). Every value is in [0, 1]. The vector has three blocks:

| block  | size | what                                                                      |
|--------|------|---------------------------------------------------------------------------|
| dense  | 16   | the heuristic's six features and its score, lengths, turns, char classes  |
| words  | 512  | hashed word unigrams and bigrams (digits folded to 0), log1p counts, L2=1 |
| chars  | 256  | hashed character trigrams (digits folded to 0), log1p counts, L2=1        |

The heuristic's cues read the last `MAX_CUE_CHARS` characters of the conversation and the n-grams
and character classes the last `MAX_FEATURE_CHARS` (the last turn matters most, and the caps bound
the cost per request: the cue regexes take ~0.5 ms per KB); lengths and turn counts read all. A
change to anything here must bump `FEATURE_VERSION`: learned scorers record the version and the
dimension they were trained with and refuse to load against another.
"""

from __future__ import annotations

import math
import re
import string
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ruyiflow.router.scorer import (
    DEPTH_SATURATION_TURNS,
    WEIGHTS,
    HeuristicScorer,
    approx_tokens,
    length_feature,
    message_text,
)

FEATURE_VERSION = "ruyiflow-features-1"
NUM_DENSE = 16
NUM_WORD_BUCKETS = 512
NUM_CHAR_BUCKETS = 256
FEATURE_DIM = NUM_DENSE + NUM_WORD_BUCKETS + NUM_CHAR_BUCKETS  # 784
MAX_FEATURE_CHARS = 2048
MAX_CUE_CHARS = 512
MAX_MESSAGE_CHARS = 32768  # the router's prompt limit (32 KiB), for the last-turn length scale
MAX_MESSAGES = 16
DENSE_NAMES = (
    *WEIGHTS,  # reasoning, maths, code, length, thinking, depth
    "heuristic_score",
    "last_user_chars",
    "num_messages",
    "has_system",
    "digit_fraction",
    "symbol_fraction",
    "upper_fraction",
    "question_marks",
    "numbers",
    "newlines",
)
assert len(DENSE_NAMES) == NUM_DENSE

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_DIGITS = str.maketrans("123456789", "000000000")
_HASH_MULTIPLIER = np.uint64(2654435761)  # Knuth's multiplicative hash constant
_HEURISTIC = HeuristicScorer()

# Byte classes for the char-class features: [256] bool tables indexed by UTF-8 byte.
_IS_DIGIT = np.zeros(256, dtype=bool)
_IS_DIGIT[ord("0") : ord("9") + 1] = True
_IS_UPPER = np.zeros(256, dtype=bool)
_IS_UPPER[ord("A") : ord("Z") + 1] = True
_IS_SYMBOL = np.zeros(256, dtype=bool)
_IS_SYMBOL[[ord(c) for c in string.punctuation]] = True


def saturating(count: float) -> float:
    """0 at 0, 0.5 at 1, 0.75 at 2, ... (as the heuristic's cue features)."""
    return 1.0 - 0.5**count


def tail_messages(messages: Sequence[dict[str, Any]], max_chars: int) -> list[dict[str, Any]]:
    """The last messages holding at most `max_chars` characters of text (the oldest one kept is
    cut from its start); roles are kept, so turn-based features still see them."""
    out: list[dict[str, Any]] = []
    budget = max_chars
    for message in reversed(messages):
        if budget <= 0:
            break
        text = message_text(message)[-budget:]
        budget -= len(text) + 1  # +1: the newline that joins messages
        out.append({"role": message.get("role", "user"), "content": text})
    return out[::-1]


def _hashed_block(counts: np.ndarray) -> np.ndarray:
    """log1p counts scaled to unit L2 norm (all zeros stays zeros): values in [0, 1]."""
    values = np.log1p(counts.astype(np.float32))
    norm = float(np.linalg.norm(values))
    return values / norm if norm > 0 else values


def word_counts(text: str) -> np.ndarray:
    """[NUM_WORD_BUCKETS] counts of hashed unigrams and bigrams of lower-cased `text`; the first
    word also appears as a bigram with a start marker (opening words carry the intent)."""
    words = _WORD.findall(text.lower().translate(_DIGITS))
    grams = [*words, *(f"{a} {b}" for a, b in zip(["<s>", *words], words, strict=False))]
    ids = [zlib.crc32(g.encode()) % NUM_WORD_BUCKETS for g in grams]
    return np.bincount(np.asarray(ids, dtype=np.int64), minlength=NUM_WORD_BUCKETS)


def char_counts(text: str) -> np.ndarray:
    """[NUM_CHAR_BUCKETS] counts of hashed byte trigrams of lower-cased `text` (vectorised)."""
    data = np.frombuffer(text.lower().translate(_DIGITS).encode(), dtype=np.uint8)
    if data.size < 3:
        return np.zeros(NUM_CHAR_BUCKETS, dtype=np.int64)
    data = data.astype(np.uint64)
    packed = (data[:-2] << np.uint64(16)) | (data[1:-1] << np.uint64(8)) | data[2:]  # [L-2]
    hashed = (packed * _HASH_MULTIPLIER) & np.uint64(0xFFFFFFFF)
    ids = (hashed >> np.uint64(32 - int(math.log2(NUM_CHAR_BUCKETS)))).astype(np.int64)
    return np.bincount(ids, minlength=NUM_CHAR_BUCKETS)


def dense_features(
    messages: Sequence[dict[str, Any]], tail: Sequence[dict[str, Any]], enable_thinking: bool | None
) -> list[float]:
    """The NUM_DENSE features in `DENSE_NAMES` order; cues read `tail`, lengths read all."""
    full_text = "\n".join(message_text(m) for m in messages)
    text = "\n".join(message_text(m) for m in tail)
    heuristic = _HEURISTIC.features(tail_messages(tail, MAX_CUE_CHARS), enable_thinking)
    heuristic["length"] = length_feature(approx_tokens(full_text))
    num_users = sum(1 for m in messages if m.get("role", "user") == "user")
    heuristic["depth"] = min(1.0, max(0, num_users - 1) / DEPTH_SATURATION_TURNS)
    easiness = math.prod(1 - WEIGHTS[name] * value for name, value in heuristic.items())
    users = [m for m in messages if m.get("role", "user") == "user"]
    last_user = message_text(users[-1]) if users else ""
    data = np.frombuffer(text.encode(), dtype=np.uint8)  # [bytes]; non-ASCII is neither class
    num_bytes = max(data.size, 1)
    return [
        *(heuristic[name] for name in WEIGHTS),
        min(1.0, max(0.0, 1 - easiness)),
        min(1.0, math.log2(1 + len(last_user)) / math.log2(1 + MAX_MESSAGE_CHARS)),
        min(1.0, len(messages) / MAX_MESSAGES),
        1.0 if any(m.get("role") == "system" for m in messages) else 0.0,
        float(np.count_nonzero(_IS_DIGIT[data])) / num_bytes,
        float(np.count_nonzero(_IS_SYMBOL[data])) / num_bytes,
        float(np.count_nonzero(_IS_UPPER[data])) / num_bytes,
        saturating(text.count("?")),
        saturating(len(_NUMBER.findall(text))),
        saturating(text.count("\n") / 4),
    ]


def featurize(
    messages: Sequence[dict[str, Any]], enable_thinking: bool | None = None
) -> np.ndarray:
    """[FEATURE_DIM] float32 features of a conversation (`[{"role", "content"}, ...]`)."""
    tail = tail_messages(messages, MAX_FEATURE_CHARS)
    text = "\n".join(message_text(m) for m in tail)
    out = np.empty(FEATURE_DIM, dtype=np.float32)
    out[:NUM_DENSE] = dense_features(messages, tail, enable_thinking)
    out[NUM_DENSE : NUM_DENSE + NUM_WORD_BUCKETS] = _hashed_block(word_counts(text))
    out[NUM_DENSE + NUM_WORD_BUCKETS :] = _hashed_block(char_counts(text))
    return out


def featurize_batch(
    conversations: Sequence[Sequence[dict[str, Any]]], enable_thinking: bool | None = None
) -> np.ndarray:
    """[N, FEATURE_DIM] float32 features of N conversations."""
    out = np.zeros((len(conversations), FEATURE_DIM), dtype=np.float32)
    for i, messages in enumerate(conversations):
        out[i] = featurize(messages, enable_thinking)
    return out


def user_prompt(text: str) -> list[dict[str, Any]]:
    """A one-turn conversation, as the router builds it for a `text` prompt."""
    return [{"role": "user", "content": text}]
