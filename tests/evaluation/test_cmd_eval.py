"""`ruyiflow eval exits` / `eval routing` through the command module (add_arguments/run)."""

from __future__ import annotations

import argparse
import json

import pytest

from ruyiflow import cmd_eval
from ruyiflow.engine.errors import InvalidRequest, ModelMismatch
from ruyiflow.evaluation.results import load_results

KEYS = {"policy", "apgr", "cpt50", "cpt80", "quality_at_half_compute", "points", "default"}


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cmd_eval.add_arguments(parser)
    return cmd_eval.run(parser.parse_args(list(argv)))


def test_exits_then_routing_json(tiny_dir, prompt_file, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    common = ["--model", str(tiny_dir), "--max-tokens", "5", "--batch", "6"]
    assert (
        run("exits", "--prompts", str(prompt_file), "--out", str(out), "--limit", "3", *common) == 0
    )
    first = load_results(out)
    assert [r.id for r in first] == ["f1", "a1", "c1"] and list(first[0].exits) == [1, 2, 4]
    assert all(r.exits[4].agreement == 1.0 and r.num_prompt_tokens > 0 for r in first)
    # resuming runs only the missing prompt and keeps the finished ones byte for byte
    before = out.read_text()
    assert run("exits", "--prompts", str(prompt_file), "--out", str(out), *common) == 0
    assert out.read_text().startswith(before) and len(load_results(out)) == 4
    assert "resuming" in capsys.readouterr().err
    with pytest.raises(ModelMismatch, match="--overwrite"):
        run("exits", "--prompts", str(prompt_file), "--out", str(out), "--model", str(tiny_dir))

    png = tmp_path / "plot.png"
    cache = tmp_path / "escalation.json"
    args = ["--results", str(out), "--json", "--plot", str(png), "--cloud-above", "1"]
    args += ["--escalation-cache", str(cache)]
    assert run("routing", "--prompts", str(prompt_file), *args, *common) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in printed.splitlines()]
    # a second run reuses the saved escalation runs and prints the same
    assert run("routing", "--prompts", str(prompt_file), *args, *common) == 0
    again = capsys.readouterr()
    assert again.out == printed and "escalation runs from" in again.err
    names = [r["policy"] for r in rows]
    assert names == [
        "always-shallowest", "always-deepest", "random", "oracle-label",
        "heuristic", "heuristic-2exit", "heuristic+escalation",
    ]  # fmt: skip
    assert all(KEYS <= set(r) for r in rows)
    deepest = rows[1]["points"][0]
    assert deepest["compute"] == 1.0 and deepest["agreement"] == 1.0
    assert deepest["cloud_share"] == 1.0 and rows[0]["points"][0]["cloud_share"] == 0.0
    assert 0.3 <= rows[2]["apgr"] <= 0.7  # random routing recovers about half the gap
    assert rows[4]["default"] is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_routing_text_table_without_results(tiny_dir, prompt_file, capsys):
    argv = ["--model", str(tiny_dir), "--max-tokens", "3", "--limit", "2", "--no-escalation"]
    assert run("routing", "--prompts", str(prompt_file), "--seeds", "5", *argv) == 0
    out = capsys.readouterr().out
    assert "mean agreement" in out and "always-deepest" in out and "escalation" not in out


def test_routing_needs_a_result_for_every_prompt(tmp_path, prompt_file):
    (tmp_path / "r.jsonl").write_text("")
    with pytest.raises(InvalidRequest, match="no records"):
        run("routing", "--prompts", str(prompt_file), "--results", str(tmp_path / "r.jsonl"))
