"""The shipped prompt set, and the prompt/result loaders rejecting bad lines by number."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation.prompts import CATEGORIES, HELDOUT_PROMPTS, TRAIN_PROMPTS, load_prompts
from ruyiflow.evaluation.results import (
    agreement,
    answer_match,
    append_result,
    build_result,
    load_results,
)


def test_shipped_prompt_sets():
    train, held = load_prompts(TRAIN_PROMPTS), load_prompts(HELDOUT_PROMPTS)
    assert len(train) + len(held) >= 300
    assert not {p.id for p in train} & {p.id for p in held}
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    by_train, by_held = Counter(p.category for p in train), Counter(p.category for p in held)
    assert set(by_train) == set(by_held) == set(CATEGORIES)
    for cat in CATEGORIES:  # about 2/3 : 1/3 within every category
        assert 0.28 <= by_held[cat] / (by_held[cat] + by_train[cat]) <= 0.38
    every = train + held
    assert all(p.answer for p in every if p.category == "arithmetic")
    assert not any(p.answer for p in every if p.category == "chat")
    assert sum(1 for p in every if p.answer) >= 150
    for p in every:
        if p.category == "arithmetic":  # an operand never gives the answer away
            assert p.answer not in re.findall(r"\d+", p.prompt), p.id


def write(tmp_path, lines):
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps(
    {"id": "a", "category": "facts", "prompt": "Capital of France?", "answer": "Paris"}
)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"id": "b", "category": "poetry", "prompt": "x"}), "category 'poetry'"),
        (json.dumps({"id": "", "category": "chat", "prompt": "x"}), "`id`"),
        (json.dumps({"id": "b", "category": "chat"}), "`prompt`"),
        (json.dumps({"id": "b", "category": "chat", "prompt": "x", "answer": 3}), "`answer`"),
        (json.dumps({"id": "b", "category": "chat", "prompt": "x", "hint": "y"}), "unknown"),
        (json.dumps({"id": "a", "category": "chat", "prompt": "x"}), "already used on line 1"),
    ],
)
def test_prompt_loader_names_the_line(tmp_path, bad, message):
    path = write(tmp_path, [GOOD, "", bad])
    with pytest.raises(InvalidRequest, match=rf"f\.jsonl:3: .*{re.escape(message)}"):
        load_prompts(path)


def test_prompt_loader_empty_and_missing(tmp_path):
    with pytest.raises(InvalidRequest, match="no records"):
        load_prompts(write(tmp_path, [""]))
    with pytest.raises(InvalidRequest, match="cannot read"):
        load_prompts(tmp_path / "absent.jsonl")
    (p,) = load_prompts(write(tmp_path, [GOOD]))
    assert p.answers == ("Paris",) and p.conversation()[0]["content"] == "Capital of France?"


def test_agreement_and_answer_match():
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert agreement([1, 9, 3], [1, 2, 3, 4]) == 0.5  # position by position, over the reference
    assert agreement([1, 2, 3, 4, 5, 6], [1, 2]) == 1.0
    assert answer_match("The answer is 1,000.", ("1000",)) is True
    assert answer_match("It is 0.95", ("0.9",)) is False  # whole tokens only
    assert answer_match("Capital: PARIS!", ("Lyon", "Paris")) is True
    assert answer_match("12 + 5 = 17", ("7",)) is False
    assert answer_match("anything", ()) is None


def result_record(**changes):
    runs = {12: ([5, 6], "five", [0.5, 0.4]), 29: ([7, 6, 8], "4", [0.9, 0.8, 0.7])}
    prompt = load_prompts_from(
        {"id": "p", "category": "arithmetic", "prompt": "2+2?", "answer": "4"}
    )
    rec = build_result(prompt, runs, 10, "fp", 8).to_dict()
    rec.update(changes)
    return rec


def load_prompts_from(obj):
    from ruyiflow.evaluation.prompts import prompt_from_dict

    return prompt_from_dict(obj, "test")


def test_result_round_trip(tmp_path):
    path = tmp_path / "r.jsonl"
    rec = result_record()
    assert rec["exits"]["12"]["agreement"] == pytest.approx(1 / 3)
    assert rec["exits"]["12"]["answer_match"] is False and rec["exits"]["29"]["answer_match"]
    assert rec["label_exit"] == 29
    prompt = load_prompts_from({k: rec[k] for k in ("id", "category", "prompt", "answer")})
    append_result(path, build_result(prompt, {29: ([1], "4", [1.0])}))
    (r,) = load_results(path)
    assert r.label_exit == 29 and r.exits[29].agreement == 1.0 and r.num_prompt_tokens is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"label_exit": 13}, "`label_exit`"),
        ({"exits": {}}, "`exits`"),
        ({"exits": {"x": {}}}, "not a layer index"),
        ({"num_prompt_tokens": "10"}, "`num_prompt_tokens`"),
        ({"extra": 1}, "unknown fields"),
        ({"answer": None}, "`answer_match` must be null exactly"),
    ],
)
def test_result_loader_names_the_line(tmp_path, change, message):
    good = json.dumps(result_record())
    path = write(tmp_path, [good.replace('"p"', '"q"', 1), json.dumps(result_record(**change))])
    with pytest.raises(InvalidRequest, match=rf"f\.jsonl:2: .*{re.escape(message)}"):
        load_results(path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("max_prob", [0.5], "one probability per token"),
        ("token_ids", [], "non-empty list"),
        ("agreement", 1.5, "in [0, 1]"),
        ("answer_match", None, "null exactly"),
    ],
)
def test_result_loader_checks_exit_fields(tmp_path, field, value, message):
    rec = result_record()
    rec["exits"]["12"][field] = value
    with pytest.raises(InvalidRequest, match=rf"f\.jsonl:1: exit 12: .*{re.escape(message)}"):
        load_results(write(tmp_path, [json.dumps(rec)]))


def test_answer_label_is_the_shallowest_exit_as_right_as_the_deepest() -> None:
    from ruyiflow.evaluation.prompts import Prompt
    from ruyiflow.evaluation.results import ExitResult, PromptResult, answer_label

    def result(matches, answer="4"):
        exits = {
            e: ExitResult([1], "x", 0.0, m, [0.5])
            for e, m in zip((12, 20, 29), matches, strict=True)
        }
        return PromptResult(Prompt("p", "arithmetic", "2+2?", answer), exits, label_exit=29)

    assert answer_label(result([False, True, True])) == 20  # the first exit that gets it right
    assert answer_label(result([False, False, False])) == 12  # deep is wrong too: cheapest
    assert answer_label(result([True, False, True])) == 12
    assert answer_label(result([None, None, None], answer=None)) == 29  # agreement label
