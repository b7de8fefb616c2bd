"""`ruyiflow calibrate --risk`: on synthetic results whose first-token confidence tells which
exits agree, it prints the table, certifies thresholds, and `--write` puts the calibration
under `router.escalation` keeping comments (a second write replaces it in place)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from ruyiflow import cmd_calibrate
from ruyiflow.cluster.topology import Topology
from ruyiflow.evaluation.features import FirstTokens
from tests.scorer.synthetic import make_records, prompt_lines, write_jsonl

REPO_TOPOLOGY = Path(__file__).parents[2] / "topology.yaml"
SHALLOW = (12, 16, 20, 24)


def sample(tmp_path: Path) -> tuple[Path, Path]:
    """Results (agreement 1 at exits >= the label, else 0.5) and first-token features whose
    max_prob is high exactly where the exit agrees."""
    records = make_records(60, seed=3)
    rng = np.random.default_rng(3)
    for r in records:
        r["fingerprint"], r["num_prompt_tokens"] = "fp-synthetic", 40
    results = write_jsonl(tmp_path / "results.jsonl", records)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_lines(records))
    agree = np.array([[r["exits"][str(e)]["agreement"] == 1.0 for e in SHALLOW] for r in records])
    max_prob = np.where(agree, 0.8, 0.2) + rng.random(agree.shape) * 0.15
    n, e = agree.shape
    table = FirstTokens(
        tuple(r["id"] for r in records),
        SHALLOW,
        np.zeros((n, e), np.int64),
        max_prob.astype(np.float32),
        (max_prob / 2).astype(np.float32),
        (3 - 3 * max_prob).astype(np.float32),
        rng.normal(size=(n, e, 8)).astype(np.float32),
        "fp-synthetic",
    )
    table.save(tmp_path / "results.features.npz")
    return prompts, results


def args_for(tmp_path: Path, prompts: Path, results: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cmd_calibrate.add_arguments(parser)
    topology = tmp_path / "topology.yaml"
    if not topology.exists():
        shutil.copy(REPO_TOPOLOGY, topology)
    argv = ["--risk", "0.1", "--delta", "0.1", "--prompts", str(prompts), "--results"]
    argv += [str(results), "--topology", str(topology), "--probes", "none", "--write"]
    return parser.parse_args(argv)


def test_risk_mode_certifies_and_writes(tmp_path, capsys) -> None:
    prompts, results = sample(tmp_path)
    args = args_for(tmp_path, prompts, results)
    assert cmd_calibrate.run(args) == 0
    out = capsys.readouterr().out
    assert "risk calibration: eps 0.1, delta 0.1" in out and "certified: level" in out
    text = Path(args.topology).read_text()
    assert "# ruyiflow default topology" in text and "# consecutive tokens ..." in text
    cal = Topology.load(args.topology).router.escalation.calibration
    assert cal.fingerprint == "fp-synthetic" and cal.eps == 0.1 and cal.n > 100
    assert [e.exit for e in cal.exits] == list(SHALLOW)
    assert cal.entry(24).is_certified  # agrees for 4 of 5 labels: it pays
    certified = [e for e in cal.exits if e.is_certified]
    assert all(0.2 < e.threshold < 0.95 for e in certified if e.measure == "max_prob")
    lines = len(text.splitlines())
    assert cmd_calibrate.run(args_for(tmp_path, prompts, results)) == 0  # replaced, not added
    assert len(Path(args.topology).read_text().splitlines()) == lines
    assert Topology.load(args.topology).router.escalation.calibration == cal
