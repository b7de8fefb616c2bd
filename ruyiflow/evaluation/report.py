"""Policy curves → RouteLLM summaries (one dict per policy) and the text table.

Weak and strong are the `always-shallowest` and `always-deepest` curves' single points. On the
compute axis the summary keys are `apgr`, `cpt50`, `cpt80`, `quality_at_half_compute`; on the
cloud-share axis the same with a `_cloud` suffix; `apgr_answer` is the compute-axis APGR with
answer accuracy as the quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation import metrics
from ruyiflow.evaluation.policies import OperatingPoint, PolicyCurve, frontier

WEAK, STRONG = "always-shallowest", "always-deepest"


def _pairs(points: Sequence[OperatingPoint], quality: str, axis: str) -> list[tuple[float, float]]:
    return [(p.cost(axis), p.quality(quality)) for p in points if p.quality(quality) is not None]


def _axis_summary(
    curve: PolicyCurve, weak: OperatingPoint, strong: OperatingPoint, quality: str, axis: str
) -> dict[str, float | None]:
    w, s = weak.quality(quality), strong.quality(quality)
    if w is None or s is None:
        return {"apgr": None, "cpt50": None, "cpt80": None, "quality_at_half": None}
    pairs = _pairs(curve.points, quality, axis)
    return metrics.summarise(pairs, (weak.cost(axis), w), (strong.cost(axis), s))


def summarise_curves(curves: Sequence[PolicyCurve], quality: str = "agreement") -> list[dict]:
    by_name = {c.name: c for c in curves}
    if WEAK not in by_name or STRONG not in by_name:
        raise InvalidRequest(f"the summary needs the {WEAK!r} and {STRONG!r} policies")
    weak, strong = by_name[WEAK].points[0], by_name[STRONG].points[0]
    rows = []
    for curve in curves:
        compute = _axis_summary(curve, weak, strong, quality, "compute")
        cloud = _axis_summary(curve, weak, strong, quality, "cloud_share")
        answer = _axis_summary(curve, weak, strong, "answer", "compute")
        rows.append(
            {
                "policy": curve.name,
                "quality": quality,
                "apgr": _round(compute["apgr"]),
                "cpt50": _round(compute["cpt50"]),
                "cpt80": _round(compute["cpt80"]),
                "quality_at_half_compute": _round(compute["quality_at_half"]),
                "apgr_cloud": _round(cloud["apgr"]),
                "cpt50_cloud": _round(cloud["cpt50"]),
                "cpt80_cloud": _round(cloud["cpt80"]),
                "quality_at_half_cloud": _round(cloud["quality_at_half"]),
                "apgr_answer": _round(answer["apgr"]),
                "default": curve.default.to_dict() if curve.default else None,
                "num_settings": len(curve.points),
                "points": [p.to_dict() for p in frontier(curve.points, quality, "compute")],
            }
        )
    return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _fmt(value: Any, width: int) -> str:
    text = "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)
    return text.rjust(width)


def format_table(rows: Sequence[dict]) -> str:
    """One line per policy: the compute-axis metrics, cloud-axis APGR/CPT50 and, for scorer
    policies, the configured thresholds' point (compute, cloud share, agreement, answers)."""
    heads = ["APGR", "CPT50", "CPT80", "Q@.5c", "APGRcl", "CPT50cl", "APGRans"]
    keys = ["apgr", "cpt50", "cpt80", "quality_at_half_compute", "apgr_cloud", "cpt50_cloud"]
    keys.append("apgr_answer")
    width = max(len(r["policy"]) for r in rows) + 2
    lines = [
        "policy".ljust(width)
        + "".join(h.rjust(8) for h in heads)
        + "   default: compute  cloud  agree  answer"
    ]
    for r in rows:
        line = r["policy"].ljust(width) + "".join(_fmt(r[k], 8) for k in keys)
        d = r["default"] or (r["points"][0] if len(r["points"]) == 1 else None)
        if d:
            line += "   " + " ".join(
                _fmt(d[k], 7) for k in ("compute", "cloud_share", "agreement", "answer_accuracy")
            ).rjust(33)
        lines.append(line)
    return "\n".join(lines)
