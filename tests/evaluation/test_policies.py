"""Policies on hand-built results: operating points, threshold sweeps, random, escalation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from ruyiflow.evaluation.policies import (
    Evaluator,
    default_thresholds,
    escalation_outcomes,
    frontier,
    route_exit,
)
from ruyiflow.evaluation.prompts import Prompt
from ruyiflow.evaluation.report import format_table, summarise_curves
from ruyiflow.evaluation.results import build_result
from ruyiflow.evaluation.routing import RoutingSetup, policy_curves

# 10 prompt tokens each. Layer-rows = (exit + 1) x (10 + generated - 1):
# a: 12 -> 13 x 12 = 156, 29 -> 30 x 12 = 360 (agree 1.0)
# b: 12 -> 13 x 11 = 143, 29 -> 30 x 13 = 390 (12 agrees on 1 of 4)
# c: 12 -> 13 x 10 = 130, 29 -> 30 x 10 = 300 (answer "4": only 29 says it)
RUNS = {
    "a": {12: ([1, 2, 3], "x", [0.9] * 3), 29: ([1, 2, 3], "x", [0.9] * 3)},
    "b": {12: ([5, 6], "y", [0.5] * 2), 29: ([7, 6, 8, 9], "y", [0.9] * 4)},
    "c": {12: ([1], "five", [0.2]), 29: ([2], "4", [0.9])},
}
DEEP = 360 + 390 + 300


def results():
    prompts = {
        "a": Prompt("a", "chat", "hello"),
        "b": Prompt("b", "chat", "hi there"),
        "c": Prompt("c", "arithmetic", "2+2?", "4"),
    }
    return [build_result(prompts[k], RUNS[k], 10, "fp", 4) for k in "abc"]


def test_fixed_points():
    ev = Evaluator(results(), cloud_above=16)
    (weak,) = ev.fixed("always-shallowest", 12).points
    assert weak.compute == pytest.approx((156 + 143 + 130) / DEEP)
    assert weak.agreement == pytest.approx((1 + 0.25 + 0) / 3)
    assert weak.answer_accuracy == 0.0 and weak.cloud_share == 0.0
    (strong,) = ev.fixed("always-deepest", 29).points
    assert (strong.compute, strong.agreement, strong.answer_accuracy) == (1.0, 1.0, 1.0)
    assert strong.cloud_share == 1.0


def test_threshold_sweep_covers_every_assignment():
    ev = Evaluator(results())
    scores = {"a": 0.1, "b": 0.6, "c": 0.9}
    curve = ev.thresholds_sweep("s", scores, [(0.5, 12), (math.inf, 29)])
    # assignments met by shifting the cut: none, a, a+b, a+b+c at exit 12
    computes = sorted(round(p.compute * DEEP) for p in curve.points)
    assert computes == [156 + 143 + 130, 156 + 143 + 300, 156 + 390 + 300, DEEP]
    d = curve.default  # a -> 12, b and c -> 29
    assert d.compute == pytest.approx((156 + 390 + 300) / DEEP)
    assert d.agreement == 1.0 and d.cloud_share == pytest.approx(2 / 3)


def test_route_exit_and_default_thresholds():
    th = default_thresholds((12, 16, 20, 24, 29))
    assert [b for b, _ in th[:-1]] == pytest.approx([0.35, 0.5, 0.65, 0.8])
    assert [route_exit(s, th) for s in (0.0, 0.35, 0.6, 0.7, 0.79, 0.8, 1.0)] == [
        12, 16, 20, 24, 24, 29, 29,
    ]  # fmt: skip
    assert route_exit(0.6, th, shift=0.2) == 16 and route_exit(0.6, th, shift=-0.3) == 29


def test_default_thresholds_mirror_the_default_topology():
    setup = RoutingSetup.from_topology("topology.yaml")
    expected = default_thresholds((12, 16, 20, 24, 29))
    assert [(round(b, 6), e) for b, e in setup.thresholds] == [
        (round(b, 6), e) for b, e in expected
    ]
    assert setup.cloud_above == 16 and setup.escalation == RoutingSetup().escalation


def test_random_interpolates_weak_and_strong():
    ev = Evaluator(results())
    points = ev.random(num_p=3, num_seeds=400).points
    weak, strong = ev.fixed("w", 12).points[0], ev.fixed("s", 29).points[0]
    assert points[0].compute == pytest.approx(weak.compute)
    assert points[-1].agreement == pytest.approx(strong.agreement)
    mid = (weak.compute + strong.compute) / 2
    assert points[1].compute == pytest.approx(mid, abs=0.03)


@dataclass
class FakeRun:
    token_ids: list[int]
    text: str
    final_exit: int
    rows: int

    def compute(self) -> int:
        return self.rows


def test_escalation_outcomes_score_against_the_deepest():
    runs = {
        ("a", 12): FakeRun([1, 2, 3], "x", 12, 156),
        ("b", 12): FakeRun([5, 6, 8, 9], "y", 29, 300),  # escalated after one token
        ("c", 12): FakeRun([2], "4", 29, 320),
    }
    table = escalation_outcomes(results(), runs)
    assert table["b"][12].agreement == 0.75 and table["b"][12].final_exit == 29
    assert table["c"][12].answer_match is True and table["a"][29].compute == 360
    curves = policy_curves(
        results(), {"h": {"a": 0.1, "b": 0.2, "c": 0.3}}, runs, RoutingSetup(num_seeds=10)
    )
    names = [c.name for c in curves]
    assert names == [
        "always-shallowest", "always-deepest", "random", "oracle-label",
        "h", "h-2exit", "h+escalation",
    ]  # fmt: skip
    esc = curves[-1].default  # everything starts at 12 (scores < 0.5)
    assert esc.compute == pytest.approx((156 + 300 + 320) / DEEP)
    assert esc.agreement == pytest.approx((1 + 0.75 + 1) / 3)
    rows = summarise_curves(curves)
    assert [r["policy"] for r in rows] == names
    assert rows[1]["apgr"] == 0.5 and rows[0]["apgr"] == 0.0  # deepest: the weak/strong line
    table_text = format_table(rows)
    assert "h+escalation" in table_text and "APGR" in table_text


def test_frontier_keeps_envelope_corners():
    ev = Evaluator(results())
    curve = ev.thresholds_sweep("s", {"a": 0.1, "b": 0.6, "c": 0.9}, [(0.5, 12), (math.inf, 29)])
    corners = frontier(curve.points, "agreement", "compute")
    assert [p.compute for p in corners] == sorted(p.compute for p in corners)
    assert all(b.agreement > a.agreement for a, b in zip(corners, corners[1:], strict=False))


def test_match_results_orders_and_checks():
    from ruyiflow.engine.errors import InvalidRequest
    from ruyiflow.evaluation.routing import match_results

    res = results()
    prompts = [r.prompt for r in reversed(res)]
    assert [r.id for r in match_results(prompts, res)] == ["c", "b", "a"]
    with pytest.raises(InvalidRequest, match="1 prompts have no result"):
        match_results([*prompts, Prompt("z", "chat", "?")], res)
    with pytest.raises(InvalidRequest, match="differs"):
        match_results([Prompt("a", "chat", "changed")], res)
