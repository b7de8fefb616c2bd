"""Feature extraction: fixed dimension, bounded, deterministic across processes, and sensitive
to what makes prompts differ."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from ruyiflow.router.features import (
    DENSE_NAMES,
    FEATURE_DIM,
    MAX_FEATURE_CHARS,
    NUM_DENSE,
    featurize,
    featurize_batch,
    tail_messages,
    user_prompt,
)
from tests.router.cluster import EASY_PROMPT, HARD_PROMPT

CONVERSATIONS = [
    user_prompt(EASY_PROMPT),
    user_prompt(HARD_PROMPT),
    user_prompt("x"),
    user_prompt("日本語のテキスト 123 ∫ x² dx " * 50),
    user_prompt(HARD_PROMPT * 300),  # far beyond the caps
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "And why?"}]},
    ],
]


def test_dimension_and_bounds() -> None:
    features = featurize_batch(CONVERSATIONS)
    assert features.shape == (len(CONVERSATIONS), FEATURE_DIM) and features.dtype == np.float32
    assert np.all(np.isfinite(features)) and features.min() >= 0.0 and features.max() <= 1.0
    # each hashed block is unit-norm when the text has words/trigrams
    words = features[:, NUM_DENSE : NUM_DENSE + 512]
    assert np.allclose(np.linalg.norm(words, axis=1), 1.0, atol=1e-5)
    assert len(DENSE_NAMES) == NUM_DENSE


def test_dense_features_read_what_they_say() -> None:
    dense = dict(zip(DENSE_NAMES, featurize(CONVERSATIONS[5])[:NUM_DENSE], strict=True))
    assert dense["has_system"] == 1.0 and dense["depth"] > 0 and dense["question_marks"] == 0.75
    easy = dict(zip(DENSE_NAMES, featurize(CONVERSATIONS[0])[:NUM_DENSE], strict=True))
    hard = dict(zip(DENSE_NAMES, featurize(CONVERSATIONS[1])[:NUM_DENSE], strict=True))
    assert hard["heuristic_score"] > easy["heuristic_score"] and hard["reasoning"] > 0.5
    assert easy["has_system"] == 0.0 and easy["code"] == 0.0
    long = dict(zip(DENSE_NAMES, featurize(CONVERSATIONS[4])[:NUM_DENSE], strict=True))
    assert long["length"] == 1.0 > hard["length"]  # length reads the whole prompt, not the tail


def test_different_prompts_differ_and_equal_prompts_agree() -> None:
    a, b = featurize(user_prompt("What is the capital of France?")), featurize(CONVERSATIONS[1])
    assert not np.allclose(a, b)
    assert np.array_equal(a, featurize(user_prompt("What is the capital of France?")))


def test_tail_keeps_the_last_characters() -> None:
    messages = [{"role": "user", "content": "a" * 100}, {"role": "assistant", "content": "b" * 50}]
    tail = tail_messages(messages, 80)
    assert [m["role"] for m in tail] == ["user", "assistant"]
    assert tail[1]["content"] == "b" * 50 and tail[0]["content"] == "a" * 29
    assert sum(len(m["content"]) for m in tail_messages(CONVERSATIONS[4], MAX_FEATURE_CHARS)) <= (
        MAX_FEATURE_CHARS
    )


def test_deterministic_across_processes_with_other_hash_seeds() -> None:
    code = (
        "import json, sys; from router.features import featurize_batch; "
        "print(json.dumps(featurize_batch(json.loads(sys.stdin.read())).tolist()))"
    )
    outputs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(CONVERSATIONS[:4]),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=True,
        )
        outputs.append(np.array(json.loads(result.stdout), dtype=np.float32))
    assert np.array_equal(outputs[0], outputs[1])
    assert np.array_equal(outputs[0], featurize_batch(CONVERSATIONS[:4]))
