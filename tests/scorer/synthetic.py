"""Small synthetic prompt sets and results files in the evaluation's format (until real ones
exist, and for fast tests): each label exit has its own vocabulary, so the task is separable."""

from __future__ import annotations

import json
import random
from pathlib import Path

EXITS = (12, 16, 20, 24, 29)
# label exit → prompt templates; `{w}` is filled with random filler words shared by every class
TEMPLATES = {
    12: ["Hello {w}, how are you today?", "Thanks a lot {w}!", "Good morning {w}."],
    16: ["What is the capital of {w}?", "Who wrote the book {w}?", "Name the colour of {w}."],
    20: ["Translate {w} into French please.", "Give a synonym for {w}.", "Spell {w} backwards."],
    24: ["Compute 37 * 49 + {n} for {w}.", "What is {n} divided by 7 for {w}?"],
    29: [
        "Prove step by step why {w} implies the theorem, then write a python function.",
        "Explain the trade-offs and derive the complexity of the {w} algorithm in code.",
    ],
}
FILLER = "apple river stone cloud lamp garden violet window marble forest ocean pencil".split()


def make_prompt(label: int, rng: random.Random) -> str:
    template = rng.choice(TEMPLATES[label])
    words = " ".join(rng.sample(FILLER, rng.randint(1, 3)))
    return template.format(w=words, n=rng.randint(10, 999))


def make_records(num_per_exit: int, seed: int, exits: tuple[int, ...] = EXITS) -> list[dict]:
    """Results records: prompt, label exit, and per-exit max_prob lists (random lengths 2..12)."""
    rng = random.Random(seed)
    records = []
    for label in exits:
        for i in range(num_per_exit):
            entries = {}
            for e in exits:
                num_tokens = rng.randint(2, 12)
                probs = [round(rng.random(), 6) for _ in range(num_tokens)]
                entries[str(e)] = {
                    "token_ids": list(range(num_tokens)),
                    "text": "x" * num_tokens,
                    "agreement": 1.0 if e >= label else 0.5,
                    "answer_match": None,
                    "max_prob": probs,
                }
            records.append(
                {
                    "id": f"s{seed}-{label}-{i}",
                    "category": "chat",
                    "prompt": make_prompt(label, rng),
                    "exits": entries,
                    "label_exit": label,
                }
            )
    rng.shuffle(records)
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prompt_lines(records: list[dict]) -> list[dict]:
    """The prompts file those results came from."""
    return [{k: r[k] for k in ("id", "category", "prompt")} for r in records]
