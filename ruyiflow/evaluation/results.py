"""Per-exit results of a prompt set (`ruyiflow eval exits`): JSON Lines, one object per prompt.

    {"id", "category", "prompt", "answer"?, "num_prompt_tokens", "fingerprint", "max_tokens",
     "exits": {"12": {"token_ids", "text", "agreement", "answer_match", "max_prob"}, ...},
     "label_exit"}

`agreement` is the fraction of the deepest exit's greedy tokens (stop token included) that this
exit reproduces position by position, over the deepest's length. `answer_match` is null when the
prompt has no answer; else whether an accepted answer occurs in the text as a whole token
(`answer_match`). `label_exit` is the shallowest exit with agreement >= 0.9 and (when the prompt
has an answer) a matching answer, else the deepest exit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation.prompts import Prompt, prompt_from_dict, read_json_lines

LABEL_AGREEMENT = 0.9
_TOP_FIELDS = {
    "id",
    "category",
    "prompt",
    "answer",
    "num_prompt_tokens",
    "fingerprint",
    "max_tokens",
    "exits",
    "label_exit",
}
_EXIT_FIELDS = {"token_ids", "text", "agreement", "answer_match", "max_prob"}
_DIGIT_COMMAS = re.compile(r"(?<=\d),(?=\d{3}\b)")


def agreement(tokens: list[int], reference: list[int]) -> float:
    """Fraction of `reference` positions where `tokens` has the same token."""
    if not reference:
        raise InvalidRequest("agreement needs a non-empty reference")
    same = sum(1 for a, b in zip(tokens, reference, strict=False) if a == b)
    return same / len(reference)


def _normalise(text: str) -> str:
    return " ".join(_DIGIT_COMMAS.sub("", text.lower()).split())


def answer_match(text: str, answers: tuple[str, ...]) -> bool | None:
    """Whether one accepted answer occurs in `text` as a whole token (no letter or digit right
    before or after it; case, spacing and thousands commas ignored). None without answers."""
    if not answers:
        return None
    norm = _normalise(text)
    for answer in answers:
        pattern = r"(?<![a-z0-9])" + re.escape(_normalise(answer)) + r"(?![a-z0-9])"
        if re.search(pattern, norm):
            return True
    return False


@dataclass(frozen=True)
class ExitResult:
    token_ids: list[int]
    text: str
    agreement: float
    answer_match: bool | None
    max_prob: list[float]  # the exit's own max probability at each generated token

    def to_dict(self) -> dict[str, Any]:
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "agreement": round(self.agreement, 6),
            "answer_match": self.answer_match,
            "max_prob": [round(p, 4) for p in self.max_prob],
        }


@dataclass(frozen=True)
class PromptResult:
    prompt: Prompt
    exits: dict[int, ExitResult]  # ascending exits
    label_exit: int
    num_prompt_tokens: int | None = None
    fingerprint: str | None = None
    max_tokens: int | None = None

    @property
    def id(self) -> str:
        return self.prompt.id

    @property
    def deepest(self) -> int:
        return max(self.exits)

    def to_dict(self) -> dict[str, Any]:
        d = self.prompt.to_dict()
        for key in ("num_prompt_tokens", "fingerprint", "max_tokens"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        d["exits"] = {str(e): r.to_dict() for e, r in sorted(self.exits.items())}
        d["label_exit"] = self.label_exit
        return d


def label_exit(exits: dict[int, ExitResult]) -> int:
    for exit_layer in sorted(exits):
        r = exits[exit_layer]
        if r.agreement >= LABEL_AGREEMENT and r.answer_match is not False:
            return exit_layer
    return max(exits)


def answer_label(result: PromptResult) -> int:
    """The shallowest exit whose short answer is as right as the deepest exit's (when the
    deepest is wrong too, the shallowest exit: deeper compute buys nothing); prompts without a
    checkable answer keep the agreement label."""
    deepest = result.exits[max(result.exits)].answer_match
    if deepest is None:
        return result.label_exit
    for exit_layer in sorted(result.exits):
        if bool(result.exits[exit_layer].answer_match) >= deepest:
            return exit_layer
    return max(result.exits)


def build_result(
    prompt: Prompt,
    runs: dict[int, tuple[list[int], str, list[float]]],
    num_prompt_tokens: int | None = None,
    fingerprint: str | None = None,
    max_tokens: int | None = None,
) -> PromptResult:
    """A PromptResult from each exit's (token ids, text, max_prob); the deepest is the reference."""
    reference = runs[max(runs)][0]
    exits = {
        e: ExitResult(ids, text, agreement(ids, reference), answer_match(text, prompt.answers), mp)
        for e, (ids, text, mp) in sorted(runs.items())
    }
    return PromptResult(
        prompt, exits, label_exit(exits), num_prompt_tokens, fingerprint, max_tokens
    )


def _exit_result(obj: Any, where: str) -> ExitResult:
    if not isinstance(obj, dict) or set(obj) != _EXIT_FIELDS:
        raise InvalidRequest(f"{where}: needs exactly the fields {sorted(_EXIT_FIELDS)}")
    ids, probs, agree = obj["token_ids"], obj["max_prob"], obj["agreement"]
    if not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids):
        raise InvalidRequest(f"{where}: `token_ids` must be a non-empty list of token ids")
    if (
        not isinstance(probs, list)
        or len(probs) != len(ids)
        or not all(isinstance(p, int | float) and 0.0 <= p <= 1.0 for p in probs)
    ):
        raise InvalidRequest(f"{where}: `max_prob` must hold one probability per token")
    if not isinstance(agree, int | float) or not 0.0 <= agree <= 1.0 or math.isnan(agree):
        raise InvalidRequest(f"{where}: `agreement` must be a number in [0, 1]")
    if obj["answer_match"] not in (True, False, None) or not isinstance(obj["text"], str):
        raise InvalidRequest(f"{where}: `answer_match` must be true/false/null, `text` a string")
    return ExitResult(
        ids, obj["text"], float(agree), obj["answer_match"], [float(p) for p in probs]
    )


def result_from_dict(obj: dict[str, Any], where: str) -> PromptResult:
    unknown = set(obj) - _TOP_FIELDS
    if unknown:
        raise InvalidRequest(f"{where}: unknown fields {sorted(unknown)}")
    prompt = prompt_from_dict(
        {k: obj[k] for k in ("id", "category", "prompt", "answer") if k in obj}, where
    )
    raw = obj.get("exits")
    if not isinstance(raw, dict) or not raw:
        raise InvalidRequest(f"{where}: `exits` must be a non-empty object")
    exits = {}
    for key, value in raw.items():
        if not key.isdigit():
            raise InvalidRequest(f"{where}: exit key {key!r} is not a layer index")
        exits[int(key)] = _exit_result(value, f"{where}: exit {key}")
        if (exits[int(key)].answer_match is None) != (prompt.answer is None):
            raise InvalidRequest(
                f"{where}: exit {key}: `answer_match` must be null exactly when there is no answer"
            )
    label = obj.get("label_exit")
    if type(label) is not int or label not in exits:
        raise InvalidRequest(f"{where}: `label_exit` must be one of the exits {sorted(exits)}")
    extras = {}
    for key, kind in (("num_prompt_tokens", int), ("fingerprint", str), ("max_tokens", int)):
        if key in obj and not isinstance(obj[key], kind):
            raise InvalidRequest(f"{where}: `{key}` must be {kind.__name__}")
        extras[key] = obj.get(key)
    return PromptResult(prompt, dict(sorted(exits.items())), label, **extras)


def load_results(path: str | Path) -> list[PromptResult]:
    """Every record of a results file, validated (errors name `file:line`); ids unique and every
    record with the same exits."""
    results, seen = [], {}
    for number, obj in read_json_lines(path):
        where = f"{path}:{number}"
        result = result_from_dict(obj, where)
        if result.id in seen:
            raise InvalidRequest(
                f"{where}: id {result.id!r} already used on line {seen[result.id]}"
            )
        if results and list(result.exits) != list(results[0].exits):
            raise InvalidRequest(
                f"{where}: exits {list(result.exits)} differ from the first record's"
                f" {list(results[0].exits)}"
            )
        seen[result.id] = number
        results.append(result)
    return results


def append_result(path: str | Path, result: PromptResult) -> None:
    """Append one record and flush it, so an interrupted run keeps every finished prompt."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
        f.flush()
