"""The evaluation prompt set: JSON Lines, one `{"id", "category", "prompt", "answer"?}` per line.

`answer` is a short final answer where the prompt has exactly one (facts, arithmetic, some
reasoning and code questions); `|` separates accepted alternatives ("8|eight"). The shipped sets
are `ruyiflow/data/prompts-train.jsonl` and `prompts-heldout.jsonl` (about 2/3 and 1/3 of 349
prompts, balanced by category).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruyiflow.engine.errors import InvalidRequest

CATEGORIES = ("chat", "facts", "arithmetic", "reasoning", "code")
DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TRAIN_PROMPTS = DATA_DIR / "prompts-train.jsonl"
HELDOUT_PROMPTS = DATA_DIR / "prompts-heldout.jsonl"
_FIELDS = {"id", "category", "prompt", "answer"}


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    prompt: str
    answer: str | None = None

    @property
    def answers(self) -> tuple[str, ...]:
        """Accepted answers (the `|`-separated alternatives); empty when there is none."""
        return tuple(a.strip() for a in self.answer.split("|")) if self.answer else ()

    def conversation(self) -> list[dict[str, Any]]:
        """The conversation a scorer sees and the chat template renders: one user turn."""
        return [{"role": "user", "content": self.prompt}]

    def to_dict(self) -> dict[str, Any]:
        d = {"id": self.id, "category": self.category, "prompt": self.prompt}
        if self.answer is not None:
            d["answer"] = self.answer
        return d


def read_json_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; InvalidRequest naming `file:line`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read {path}: {exc}") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InvalidRequest(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise InvalidRequest(f"{path}:{number}: expected a JSON object")
        rows.append((number, obj))
    if not rows:
        raise InvalidRequest(f"{path}: no records")
    return rows


def prompt_from_dict(obj: dict[str, Any], where: str, extra_ok: bool = False) -> Prompt:
    """Validate the prompt fields of one record (`where` prefixes error messages)."""
    unknown = set(obj) - _FIELDS
    if unknown and not extra_ok:
        raise InvalidRequest(f"{where}: unknown fields {sorted(unknown)}")
    for key in ("id", "category", "prompt"):
        value = obj.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(f"{where}: `{key}` must be a non-empty string")
    if obj["category"] not in CATEGORIES:
        raise InvalidRequest(
            f"{where}: category {obj['category']!r} is not one of {', '.join(CATEGORIES)}"
        )
    answer = obj.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise InvalidRequest(f"{where}: `answer` must be a non-empty string when present")
    return Prompt(obj["id"], obj["category"], obj["prompt"], answer)


def load_prompts(path: str | Path) -> list[Prompt]:
    """Every prompt of a JSON Lines file, validated; ids must be unique."""
    prompts, seen = [], {}
    for number, obj in read_json_lines(path):
        where = f"{path}:{number}"
        prompt = prompt_from_dict(obj, where)
        if prompt.id in seen:
            raise InvalidRequest(
                f"{where}: id {prompt.id!r} already used on line {seen[prompt.id]}"
            )
        seen[prompt.id] = number
        prompts.append(prompt)
    return prompts
