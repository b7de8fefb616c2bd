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


GATED = """
models: {{tiny: {{path: "{path}"}}}}
nodes:
  - {{name: e, tier: edge, listen: '127.0.0.1:1', metrics: '127.0.0.1:2', model: tiny,
     exits: [1, 2]}}
  - {{name: c, tier: cloud, listen: '127.0.0.1:3', metrics: '127.0.0.1:4', model: tiny,
     exits: [4]}}
router:
  listen: 127.0.0.1:5
  metrics: 127.0.0.1:6
  http: ''
  thresholds: [{{below: 0.35, exit: 1}}, {{below: 0.5, exit: 2}}, {{exit: 4}}]
  escalation:
    enabled: true
    calibration:
      {{eps: 0.3, delta: 0.1, n: 50, date: x, fingerprint: "{fingerprint}",
       exits: [{{exit: 1, measure: max_prob, threshold: {threshold}}},
               {{exit: 2, measure: max_prob, threshold: null}}]}}
"""


def test_routing_reports_the_default_policy(tiny_dir, prompt_file, tmp_path, capsys):
    from ruyiflow.evaluation.features import load_first_tokens

    out, features = tmp_path / "results.jsonl", tmp_path / "results.features.npz"
    common = ["--model", str(tiny_dir), "--max-tokens", "4"]
    argv = ["--prompts", str(prompt_file), "--out", str(out), "--features", str(features)]
    assert run("exits", *argv, *common) == 0
    fingerprint = load_results(out)[0].fingerprint
    table = load_first_tokens(features, fingerprint)
    # the heuristic sends f1, a1, c1 to exit 1 (certified: 2 of the 3 pass) and k1 to exit 2
    # (certified nothing: it starts at 4)
    threshold = float(sorted(table.measure("max_prob", i, 1) for i in ("f1", "a1", "c1"))[1])
    topology = tmp_path / "topology.yaml"
    text = GATED.format(path=tiny_dir, fingerprint=fingerprint, threshold=threshold)
    topology.write_text(text)
    routing = ["routing", "--prompts", str(prompt_file), "--results", str(out), "--no-escalation"]
    assert run(*routing, "--topology", str(topology), "--seeds", "5") == 0
    printed = capsys.readouterr().out
    rows = printed.split("policy ")[1].splitlines()
    assert rows[1].startswith("default ") and "max_prob-gate" in rows[2]
    assert "default: realised disagreement " in printed and "vs calibrated eps 0.3" in printed
    assert "of always-deepest's" in printed and "default: APGR " in printed
    assert run(*routing, "--topology", str(topology), "--json", "--quality", "answer") == 0
    default = json.loads(capsys.readouterr().out.splitlines()[0])
    assert default["policy"] == "default" and default["quality"] == "answer"
    (point,) = default["points"]
    assert point["cloud_share"] == 0.5 and point["compute"] < 1.0
    # a calibration for other weights is refused, as a node would refuse it
    topology.write_text(text.replace(fingerprint, "0" * len(fingerprint)))
    with pytest.raises(ModelMismatch, match="calibrate again|Calibrate again"):
        run(*routing, "--topology", str(topology))
