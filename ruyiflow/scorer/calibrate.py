"""Calibrate the router: thresholds for a target cloud share, and the escalation max-prob
threshold for a target share of edge requests that escalate. Pure Python over scores and the
evaluation's per-token confidences; the routing itself is `router.policy.plan_route`, over the
thresholds alone: a risk calibration (`router.escalation.calibration`) moves requests the
thresholds send to an uncertified exit on to the next certified one, and with none certified
every band would start at the deepest exit, leaving nothing to cut. These settings take effect
where the gate lets a shallow exit serve.

Thresholds. The entries of `router.thresholds` fall into an edge run and a cloud run (by the tier
`plan_route` gives a score in each band). The cut between them moves to `c`, chosen among the
sample's scores so that a share S of them is `>= c` (cloud); the other boundaries keep their
relative spacing: edge-side ones scale from [0, old cut] onto [0, c], cloud-side ones from
[old cut, 1] onto [c, 1]. With distinct scores the realised share is within 1/N of S.

Escalation. A node escalates when `window` consecutive tokens have max_prob < T, i.e. when
`v = min over windows of max(max_prob in the window)` is < T; T is chosen among the `v` of the
requests that stay on the edge (at the exit they are routed to) so that a share E have v < T.
Requests shorter than the window never escalate.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ruyiflow.cluster.router_spec import Threshold
from ruyiflow.cluster.topology import Topology
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation.prompts import Prompt
from ruyiflow.evaluation.results import PromptResult
from ruyiflow.router.policy import RoutePlan, plan_route

DIGITS = 6  # thresholds are written rounded; rounding is checked not to move any sample


def check_share(share: float, name: str) -> float:
    if not (isinstance(share, int | float) and math.isfinite(share) and 0.0 <= share <= 1.0):
        raise InvalidRequest(f"{name} must be a fraction in [0, 1], got {share!r}")
    return float(share)


def split_point(sorted_values: Sequence[float], num_below: int) -> float | None:
    """A point c in (0, 1) with exactly `num_below` of the ascending values < c (the midpoint
    of the gap), or None when ties or the ends of (0, 1) make that count impossible."""
    n = len(sorted_values)
    low = sorted_values[num_below - 1] if num_below > 0 else 0.0
    high = sorted_values[num_below] if num_below < n else 1.0
    if not low < high:
        return None
    point = (low + high) / 2
    rounded = round(point, DIGITS)
    return rounded if low < rounded <= high and 0.0 < rounded < 1.0 else point


def split_for_share(
    values: Sequence[float], share_below: float, num_total: int | None = None
) -> tuple[float, int]:
    """(c, k): the split point whose count k of values below it is nearest `share_below` of
    `num_total` (default: all values); values may include +inf (never below any c)."""
    ordered = sorted(v for v in values if math.isfinite(v))
    total = num_total if num_total is not None else len(values)
    if total == 0:
        raise InvalidRequest("no samples to calibrate on")
    best: tuple[float, int, float] | None = None
    for k in range(len(ordered) + 1):
        point = split_point(ordered, k)
        if point is None:
            continue
        error = abs(k / total - share_below)
        if best is None or error < best[2]:
            best = (point, k, error)
    if best is None:
        raise InvalidRequest("every sample has the same value at 0 or 1: nothing to split")
    return best[0], best[1]


def route(topology: Topology, score: float) -> RoutePlan:
    """Where the thresholds alone send `score` (module docstring: the gate's start ignored)."""
    escalation = dataclasses.replace(topology.router.escalation, calibration=None)
    return plan_route(with_router(topology, escalation=escalation), score)


def band_tiers(topology: Topology) -> list[str]:
    """The tier each threshold entry routes to (probing one score inside each band)."""
    thresholds = topology.router.thresholds
    probes = [0.0] + [t.below for t in thresholds[:-1]]  # score == previous below: this band
    return [route(topology, min(p, 1.0)).tier for p in probes]


def rescale_thresholds(
    thresholds: Sequence[Threshold], tiers: Sequence[str], cut: float
) -> tuple[Threshold, ...]:
    """Move the edge→cloud boundary to `cut`, keeping the relative spacing on each side."""
    if "cloud" not in tiers or "edge" not in tiers:
        raise InvalidRequest(
            f"the thresholds route only to {sorted(set(tiers))}: calibration needs both an edge "
            "band and a cloud band"
        )
    first_cloud = tiers.index("cloud")
    if any(t != "cloud" for t in tiers[first_cloud:]):
        raise InvalidRequest("the thresholds alternate between tiers: no single edge/cloud cut")
    old_cut = thresholds[first_cloud - 1].below
    out = []
    for i, threshold in enumerate(thresholds):
        below = threshold.below
        if i == first_cloud - 1:
            below = cut
        elif i < first_cloud:
            below = cut * below / old_cut
        elif math.isfinite(below):
            below = cut + (below - old_cut) * (1.0 - cut) / (1.0 - old_cut)
        out.append(dataclasses.replace(threshold, below=below))
    return tuple(out)


def with_router(topology: Topology, **changes: object) -> Topology:
    return dataclasses.replace(topology, router=dataclasses.replace(topology.router, **changes))


@dataclass(frozen=True)
class ThresholdCalibration:
    thresholds: tuple[Threshold, ...]
    cut: float
    num_prompts: int
    num_cloud: int
    exit_counts: dict[int, int]  # exit → prompts routed there

    @property
    def cloud_share(self) -> float:
        return self.num_cloud / self.num_prompts


def calibrate_thresholds(
    topology: Topology, scores: Sequence[float], target_cloud_share: float
) -> ThresholdCalibration:
    """New thresholds routing a share `target_cloud_share` of `scores` to cloud tiers."""
    target = check_share(target_cloud_share, "target cloud share")
    if not scores:
        raise InvalidRequest("no prompts to calibrate on")
    cut, _ = split_for_share(scores, 1.0 - target)
    tiers = band_tiers(topology)
    thresholds = rescale_thresholds(topology.router.thresholds, tiers, cut)
    rounded = tuple(
        dataclasses.replace(t, below=round(t.below, DIGITS)) if math.isfinite(t.below) else t
        for t in thresholds
    )
    num_cloud = sum(s >= cut for s in scores)
    try:  # rounded for the YAML, unless rounding merges two boundaries or moves a sample
        calibrated = with_router(topology, thresholds=rounded)
        plans = [route(calibrated, s) for s in scores]
        if sum(p.tier == "cloud" for p in plans) != num_cloud:
            raise ValueError("rounding moved a sample across the cut")
    except ValueError:  # TopologyError is a ValueError
        calibrated = with_router(topology, thresholds=thresholds)
        plans = [route(calibrated, s) for s in scores]
    return ThresholdCalibration(
        thresholds=calibrated.router.thresholds,
        cut=cut,
        num_prompts=len(scores),
        num_cloud=sum(p.tier == "cloud" for p in plans),  # == num_cloud: cut is a band edge
        exit_counts=dict(sorted(Counter(p.exit for p in plans).items())),
    )


def escalation_value(max_probs: Sequence[float], window: int) -> float:
    """min over windows of `window` consecutive tokens of the window's max max_prob; the
    request escalates iff this is < the threshold (+inf: too short to ever escalate)."""
    if len(max_probs) < window:
        return math.inf
    return min(max(max_probs[i : i + window]) for i in range(len(max_probs) - window + 1))


@dataclass(frozen=True)
class EscalationCalibration:
    threshold: float
    window: int
    num_edge: int
    num_escalated: int
    num_too_short: int  # edge requests with fewer tokens than the window

    @property
    def escalation_share(self) -> float:
        return self.num_escalated / self.num_edge


def edge_values(
    topology: Topology,
    prompts: Sequence[Prompt],
    scores: Sequence[float],
    results: Sequence[PromptResult],
    tier: str = "edge",
) -> list[float]:
    """Escalation values of the prompts `topology` routes to `tier`, at their routed exit."""
    by_id = {r.id: r for r in results}
    window = topology.router.escalation.window
    values = []
    for prompt, score in zip(prompts, scores, strict=True):
        plan = route(topology, score)
        if plan.tier != tier:
            continue
        result = by_id.get(prompt.id)
        if result is None:
            raise InvalidRequest(f"the results file has no entry for prompt {prompt.id!r}")
        if plan.exit not in result.exits:
            raise InvalidRequest(f"the results for {prompt.id!r} lack exit {plan.exit}")
        values.append(escalation_value(result.exits[plan.exit].max_prob, window))
    return values


def calibrate_escalation(
    topology: Topology,
    prompts: Sequence[Prompt],
    scores: Sequence[float],
    results: Sequence[PromptResult],
    target_share: float,
) -> EscalationCalibration:
    """The max-prob threshold making a share `target_share` of `topology`'s edge requests
    escalate (topology: already carrying the calibrated thresholds)."""
    target = check_share(target_share, "target escalation share")
    values = edge_values(topology, prompts, scores, results)
    if not values:
        raise InvalidRequest("no sample prompt stays on the edge: nothing to calibrate")
    threshold, num_escalated = split_for_share(values, target)
    return EscalationCalibration(
        threshold=threshold,
        window=topology.router.escalation.window,
        num_edge=len(values),
        num_escalated=num_escalated,
        num_too_short=sum(1 for v in values if math.isinf(v)),
    )


def escalation_share(values: Sequence[float], threshold: float) -> float:
    """Share of requests (escalation values) that escalate under `threshold`."""
    return sum(v < threshold for v in values) / len(values) if values else 0.0
