"""Calibration: thresholds hit the target cloud share within 1/N, the escalation threshold hits
the target escalation share, both over the thresholds' own routing (the shipped risk
calibration, which certifies nothing, would start every band at the deepest exit), bad targets
and inputs are refused, `--write` keeps comments."""

from __future__ import annotations

import argparse
import math
import random
import shutil
from pathlib import Path

import pytest

from ruyiflow import cmd_calibrate
from ruyiflow.cluster.router_spec import Threshold
from ruyiflow.cluster.topology import Topology
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation.prompts import load_prompts
from ruyiflow.evaluation.results import load_results
from ruyiflow.router.policy import plan_route
from ruyiflow.scorer import calibrate as cal
from tests.scorer.synthetic import make_records, prompt_lines, write_jsonl

REPO_TOPOLOGY = Path(__file__).parents[2] / "topology.yaml"


def test_split_points() -> None:
    values = [0.1, 0.2, 0.2, 0.6]
    assert cal.split_point(values, 0) == 0.05 and cal.split_point(values, 1) == 0.15
    assert cal.split_point(values, 2) is None  # a tie cannot be split
    assert cal.split_point(values, 4) == 0.8
    assert cal.split_for_share([0.3, math.inf, 0.5, 0.7], 0.5) == (0.6, 2)
    assert cal.split_for_share([0.5] * 4, 0.5) == (0.25, 0)  # ties: all or nothing
    assert cal.split_for_share([0.0, 0.0, 1.0], 1.0) == (0.5, 2)  # 1.0 is never below


def test_thresholds_route_before_the_gate() -> None:
    topology = Topology.load(REPO_TOPOLOGY)
    assert topology.router.escalation.calibration is not None
    assert plan_route(topology, 0.0).exit == 29 and plan_route(topology, 0.0).scored_exit == 12
    assert cal.route(topology, 0.0).exit == 12 and cal.route(topology, 0.0).tier == "edge"
    assert cal.band_tiers(topology) == ["edge", "edge", "cloud", "cloud", "cloud"]


def test_escalation_value_is_the_best_window() -> None:
    assert cal.escalation_value([0.9, 0.2, 0.1, 0.3, 0.8], window=2) == 0.2
    assert cal.escalation_value([0.9, 0.2, 0.1, 0.3, 0.8], window=3) == 0.3
    assert math.isinf(cal.escalation_value([0.1, 0.1], window=3))


@pytest.mark.parametrize("target", [0.0, 0.1, 0.33, 0.5, 0.8, 1.0])
def test_thresholds_hit_the_target_share(target) -> None:
    topology = Topology.load(REPO_TOPOLOGY)
    rng = random.Random(5)
    scores = [rng.random() for _ in range(97)]
    result = cal.calibrate_thresholds(topology, scores, target)
    assert abs(result.cloud_share - target) <= 1 / len(scores)
    calibrated = cal.with_router(topology, thresholds=result.thresholds)
    realised = sum(cal.route(calibrated, s).tier == "cloud" for s in scores) / len(scores)
    assert realised == result.cloud_share
    assert sum(result.exit_counts.values()) == len(scores)
    old = [t.below for t in topology.router.thresholds]
    new = [t.below for t in result.thresholds]
    # edge side: 0.35 : 0.50 kept; cloud side: (0.65 - 0.5) : (0.8 - 0.5) : (1 - 0.5) kept
    rounding = 2 * 10**-cal.DIGITS  # boundaries are written rounded
    assert new[0] / new[1] == pytest.approx(old[0] / old[1], abs=rounding / new[1])
    span = 1 - new[1]
    tolerance = rounding / span
    assert (new[2] - new[1]) / span == pytest.approx(0.3, abs=tolerance)
    assert (new[3] - new[1]) / span == pytest.approx(0.6, abs=tolerance)
    assert [t.exit for t in result.thresholds] == [12, 16, 20, 24, 29]


def test_thresholds_refuse_bad_targets_and_topologies() -> None:
    topology = Topology.load(REPO_TOPOLOGY)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(InvalidRequest, match="target cloud share"):
            cal.calibrate_thresholds(topology, [0.5], bad)
    with pytest.raises(InvalidRequest, match="no prompts"):
        cal.calibrate_thresholds(topology, [], 0.5)
    edge_only = cal.with_router(topology, thresholds=(Threshold(12, 0.5), Threshold(16)))
    with pytest.raises(InvalidRequest, match="needs both an edge band and a cloud band"):
        cal.calibrate_thresholds(edge_only, [0.2, 0.7], 0.5)


def _sample(tmp_path: Path, num_per_exit: int = 12):
    records = make_records(num_per_exit, seed=11)
    results = write_jsonl(tmp_path / "results.jsonl", records)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", prompt_lines(records))
    return prompts, load_prompts(prompts), load_results(results)


@pytest.mark.parametrize("target", [0.0, 0.25, 0.5])
def test_escalation_hits_the_target_share(tmp_path, target) -> None:
    from ruyiflow.router.scorer import HeuristicScorer

    _, prompts, results = _sample(tmp_path)
    topology = Topology.load(REPO_TOPOLOGY)
    scores = [HeuristicScorer().score(p.conversation()) for p in prompts]
    calibrated = cal.calibrate_thresholds(topology, scores, 0.4)
    topology = cal.with_router(topology, thresholds=calibrated.thresholds)
    esc = cal.calibrate_escalation(topology, prompts, scores, results, target)
    assert esc.num_edge == calibrated.num_prompts - calibrated.num_cloud
    assert abs(esc.escalation_share - target) <= 1 / esc.num_edge
    assert 0.0 < esc.threshold < 1.0
    # replay the node's rule (EscalationWatch) on the edge prompts' max_prob at their exit
    from ruyiflow.node.escalation import EscalationSettings, EscalationWatch

    by_id = {r.id: r for r in results}
    escalated = 0
    for prompt, score in zip(prompts, scores, strict=True):
        plan = cal.route(topology, score)
        if plan.tier == "edge":
            watch = EscalationWatch(EscalationSettings(True, esc.window, esc.threshold))
            probs = by_id[prompt.id].exits[plan.exit].max_prob
            escalated += any(watch.observe(p) for p in probs)
    assert escalated == esc.num_escalated


def test_escalation_needs_matching_results(tmp_path) -> None:
    _, prompts, results = _sample(tmp_path)
    topology = Topology.load(REPO_TOPOLOGY)
    scores = [0.0] * len(prompts)  # everything on edge exit 12
    with pytest.raises(InvalidRequest, match="no entry for prompt"):
        cal.calibrate_escalation(topology, prompts, scores, results[1:], 0.2)
    with pytest.raises(InvalidRequest, match="target escalation share"):
        cal.calibrate_escalation(topology, prompts, scores, results, 2.0)
    with pytest.raises(InvalidRequest, match="stays on the edge"):
        cal.calibrate_escalation(topology, prompts, [1.0] * len(prompts), results, 0.2)


def _args(tmp_path: Path, **kwargs) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cmd_calibrate.add_arguments(parser)
    prompts, _, _ = _sample(tmp_path)
    topology = tmp_path / "topology.yaml"
    shutil.copy(REPO_TOPOLOGY, topology)
    argv = ["--prompts", str(prompts), "--topology", str(topology)]
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def test_command_prints_fragment_and_writes_keeping_comments(tmp_path, capsys) -> None:
    args = _args(
        tmp_path,
        target_cloud_share=0.3,
        results=tmp_path / "results.jsonl",
        target_escalation_share=0.2,
        write=True,
    )
    assert cmd_calibrate.run(args) == 0
    out = capsys.readouterr().out
    assert "cloud share 0.300" in out and out.count("- {") == 5 and "escalation:" in out
    text = Path(args.topology).read_text()
    original = REPO_TOPOLOGY.read_text()
    assert "# ruyiflow default topology" in text and "# consecutive tokens ..." in text
    assert "# loopback; a real edge uplink" in text
    before, after = Topology.load(REPO_TOPOLOGY), Topology.load(args.topology)
    assert after.nodes == before.nodes and after.links == before.links
    assert after.router.thresholds != before.router.thresholds
    assert after.router.escalation.window == 4
    assert f"threshold: {after.router.escalation.threshold!r}" in text
    assert after.router.target_cloud_share == 0.3  # exported by the router as the target
    assert len(text.splitlines()) == len(original.splitlines()) + 1  # that one new line


def test_command_refuses_bad_input(tmp_path) -> None:
    with pytest.raises(InvalidRequest, match="--target-cloud-share"):
        cmd_calibrate.run(_args(tmp_path, target_cloud_share=1.2))
    with pytest.raises(InvalidRequest, match="needs --results"):
        cmd_calibrate.run(_args(tmp_path, target_cloud_share=0.3, target_escalation_share=0.1))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    args = _args(tmp_path, target_cloud_share=0.3)
    args.prompts = str(empty)
    with pytest.raises(InvalidRequest, match="no records"):
        cmd_calibrate.run(args)
