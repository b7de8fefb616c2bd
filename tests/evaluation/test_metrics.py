"""RouteLLM metrics on hand-computed curves (weak/strong/upper-envelope conventions of
ruyiflow.evaluation.metrics)."""

from __future__ import annotations

import pytest

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation import metrics

WEAK, STRONG = (0.4, 0.2), (1.0, 1.0)


def test_pgr():
    assert metrics.pgr(0.6, 0.2, 1.0) == pytest.approx(0.5)
    assert metrics.pgr(0.2, 0.2, 1.0) == 0.0 and metrics.pgr(1.0, 0.2, 1.0) == 1.0
    assert metrics.pgr(0.1, 0.2, 1.0) == pytest.approx(-0.125)
    with pytest.raises(InvalidRequest, match="undefined"):
        metrics.pgr(0.5, 0.3, 0.3)


def test_points_on_the_weak_strong_line():
    # collinear with weak and strong: PGR(c) = (c - 0.4) / 0.6, the random router's line
    points = [(0.4, 0.2), (0.7, 0.6), (1.0, 1.0)]
    assert metrics.apgr(points, WEAK, STRONG) == pytest.approx(0.5)
    assert metrics.cpt(points, WEAK, STRONG, 0.5) == pytest.approx(0.7)
    assert metrics.cpt(points, WEAK, STRONG, 0.8) == pytest.approx(0.88)
    assert metrics.quality_at(points, 0.5, WEAK) == pytest.approx(0.2 + 0.1 * 4 / 3)
    assert metrics.quality_at(points, 0.75, WEAK) == pytest.approx(0.6 + 0.05 * 4 / 3)
    assert metrics.quality_at(points, 0.3, WEAK) is None  # below every point


def test_envelope_drops_dominated_points_and_goes_flat():
    # corners (0.4, 0.2) -> (0.55, 0.68) -> (0.85, 0.92), flat after; (0.6, 0.5) is dominated.
    # PGR at the corners: 0, 0.6, 0.9 (and 0.9 at 1.0). Trapezoids:
    # 0.15 x 0.3 + 0.3 x 0.75 + 0.15 x 0.9 = 0.405 over a width of 0.6.
    points = [(0.55, 0.68), (0.6, 0.5), (0.85, 0.92)]
    assert metrics.envelope(points, WEAK) == [(0.4, 0.2), (0.55, 0.68), (0.85, 0.92)]
    assert metrics.apgr(points, WEAK, STRONG) == pytest.approx(0.675)
    assert metrics.cpt(points, WEAK, STRONG, 0.5) == pytest.approx(0.4 + 0.15 * 0.5 / 0.6)
    assert metrics.cpt(points, WEAK, STRONG, 0.8) == pytest.approx(0.75)
    assert metrics.cpt(points, WEAK, STRONG, 0.9) == pytest.approx(0.85)
    assert metrics.cpt(points, WEAK, STRONG, 0.95) is None  # Q never reaches it
    assert metrics.cpt(points, WEAK, STRONG, 0.0) == pytest.approx(0.4)  # the weak point
    assert metrics.quality_at(points, 0.62, WEAK) == pytest.approx(0.68 + 0.07 * 0.8)
    assert metrics.quality_at(points, 0.99, WEAK) == pytest.approx(0.92)


def test_router_worse_than_random_scores_under_one_half():
    # corners (0.4, 0.2) -> (0.7, 0.3) -> (1.0, 1.0): PGR 0, 0.125, 1 (no concave hull, which
    # would be the straight weak-strong line and score 0.5)
    points = [(0.7, 0.3), (1.0, 1.0)]
    expected = (0.3 * (0 + 0.125) / 2 + 0.3 * (0.125 + 1) / 2) / 0.6  # 0.3125
    assert metrics.apgr(points, WEAK, STRONG) == pytest.approx(expected)
    assert metrics.cpt(points, WEAK, STRONG, 0.5) == pytest.approx(0.7 + 0.3 * 0.375 / 0.875)


def test_random_router_on_cloud_axis_scores_one_half():
    weak, strong = (0.0, 0.3), (1.0, 0.9)
    points = [(p, 0.3 + 0.6 * p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert metrics.apgr(points, weak, strong) == pytest.approx(0.5)
    assert metrics.cpt(points, weak, strong, 0.5) == pytest.approx(0.5)
    assert metrics.apgr([strong], weak, strong) == pytest.approx(0.5)  # mixing weak/strong
    assert metrics.apgr([], weak, strong) == 0.0  # the weak point alone


def test_points_dearer_than_strong():
    # hull (0.4, 0.2) -> (0.7, 0.6) -> (1.2, 1.0): Q(1.0) = 0.84, PGR 0.8
    points = [(0.7, 0.6), (1.2, 1.0)]
    expected = (0.3 * (0 + 0.5) / 2 + 0.3 * (0.5 + 0.8) / 2) / 0.6
    assert metrics.apgr(points, WEAK, STRONG) == pytest.approx(expected)
    assert metrics.cpt(points, WEAK, STRONG, 0.9) == pytest.approx(1.1)


def test_summarise_and_degenerate_gap():
    out = metrics.summarise([(0.7, 0.6), (1.0, 1.0)], WEAK, STRONG)
    assert out == pytest.approx(
        {"apgr": 0.5, "cpt50": 0.7, "cpt80": 0.88, "quality_at_half": 0.2 + 0.1 * 4 / 3}
    )
    flat = metrics.summarise([(0.7, 0.5)], (0.4, 0.5), (1.0, 0.5))
    assert flat["apgr"] is None and flat["cpt50"] is None and flat["quality_at_half"] == 0.5
    with pytest.raises(InvalidRequest, match="strong cost"):
        metrics.apgr([], (1.0, 0.2), (1.0, 0.9))
