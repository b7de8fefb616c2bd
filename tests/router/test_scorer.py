"""HeuristicScorer: easy prompts low, hard prompts high, bounded, deterministic, monotone."""

from __future__ import annotations

import random

import pytest

from ruyiflow.router.scorer import HeuristicScorer, Scorer, length_feature
from ruyiflow.router.scorers import make_scorer, scorer_names

EASY = ["Hi!", "What is the capital of France?", "Hello, how are you?", "Tell me a joke."]
HARD = [
    "Prove that there are infinitely many primes, step by step, then write Python code that "
    "prints the first 100 primes.",
    "Explain step by step why the integral of 1/x from 1 to e equals 1, derive it, and "
    "implement a Python function that checks it numerically.",
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return make_scorer("heuristic")


def test_registry() -> None:
    assert "heuristic" in scorer_names()
    assert isinstance(make_scorer("heuristic"), HeuristicScorer)
    assert "learned" in scorer_names()
    with pytest.raises(ValueError, match="unknown scorer"):
        make_scorer("learned-v9")


def test_length_feature_scale() -> None:
    assert length_feature(0) == length_feature(16) == 0.0
    assert length_feature(4096) == length_feature(10**6) == 1.0
    assert length_feature(256) == pytest.approx(0.5)  # log2 halfway between 16 and 4096


@pytest.mark.parametrize("text", EASY)
def test_easy_prompts_score_low(scorer: Scorer, text: str) -> None:
    assert scorer.score(user(text), None) < 0.3


@pytest.mark.parametrize("text", HARD)
def test_hard_prompts_score_high(scorer: Scorer, text: str) -> None:
    assert scorer.score(user(text), None) > 0.7


def test_easy_below_medium_below_hard(scorer: Scorer) -> None:
    easy = scorer.score(user("What is the capital of France?"))
    medium = scorer.score(user("Explain why the sky is blue."))
    hard = scorer.score(user(HARD[0]))
    assert easy < medium < hard


def test_bounded_and_deterministic(scorer: Scorer) -> None:
    rng = random.Random(0)
    words = "why prove ``` def x = 1 + 2 integral SELECT a FROM b step by step " * 3
    vocabulary = words.split() + ["lorem", "ipsum", "∫", "λ", ""]
    for _ in range(60):
        text = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 600)))
        turns = [{"role": rng.choice(["user", "assistant"]), "content": text}] * rng.randint(1, 9)
        score = scorer.score(turns, rng.choice([None, True, False]))
        assert 0.0 <= score <= 1.0
    assert scorer.score([], None) == 0.0
    assert scorer.score(user(HARD[0])) == scorer.score(user(HARD[0]))


def test_monotone_in_cues_length_turns_and_thinking(scorer: Scorer) -> None:
    base = "Tell me about the moon."
    steps = [" Why is it bright?", " Prove it.", " Calculate 3 * 4 = 12.", " ```def f(): pass```"]
    text, previous = base, scorer.score(user(base))
    for step in steps:
        text += step
        current = scorer.score(user(text))
        assert current > previous, step
        previous = current
    long = scorer.score(user(base + " and the sun" * 400))
    assert long > scorer.score(user(base))
    conversation = user(base) + [{"role": "assistant", "content": "ok"}] + user("more")
    assert scorer.score(conversation) > scorer.score(user(base))
    assert scorer.score(user(base), True) > scorer.score(user(base), None)
    assert scorer.score(user(base), False) == scorer.score(user(base), None)


def test_content_parts(scorer: Scorer) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": HARD[0]}]}]
    assert scorer.score(parts) == scorer.score(user(HARD[0]))
