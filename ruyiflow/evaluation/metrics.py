"""RouteLLM's router metrics (Ong et al., 2024) over (cost, quality) points, pure Python.

Weak = always the shallowest exit, strong = always the deepest exit, each one point
(c_weak, q_weak) and (c_strong, q_strong) on the chosen cost axis.

- PGR(q) = (q - q_weak) / (q_strong - q_weak): performance gap recovered (0 = weak, 1 = strong).
- Interpolation (our choice): a policy's quality at budget c, Q(c), is the monotone upper
  envelope of its points plus the weak point (at any budget >= c_weak a router can serve
  everything at the weak exit). Its corners are the points better than every cheaper point;
  between two corners Q is linear (RouteLLM's trapezoidal rule; a router mixing the two
  operating points per request lands on that segment in expectation), after the last corner Q
  is flat (a router can always spend less than the budget). We deliberately do not take the
  concave hull: every threshold sweep contains all-weak and all-strong, so its hull would
  always contain the random router's line and hide a scorer that ranks worse than chance.
- APGR = the mean of PGR(Q(c)) over c in [c_weak, c_strong], i.e. the area under PGR versus the
  cost rescaled to [0, 1] by (c - c_weak) / (c_strong - c_weak). On the cloud-share axis
  (c_weak = 0, c_strong = 1) that is RouteLLM's "percentage of calls to the strong model"; on
  the compute axis the rescaling maps always-shallowest to 0. Exact (piecewise linear). Random
  weak/strong routing scores 0.5; always-deepest alone scores 0.5 too (its segment from the
  weak point is exactly the random router's line).
- CPT(x) = the smallest cost c with PGR(Q(c)) >= x, in the cost axis' own units; None if Q
  never reaches x. It may exceed c_strong (a policy dearer than always-deepest).
- quality_at(c) = Q(c), the raw quality of the envelope at budget c (None below every point).
"""

from __future__ import annotations

from collections.abc import Sequence

from ruyiflow.engine.errors import InvalidRequest

Point = tuple[float, float]  # (cost, quality)
EPS = 1e-12


def pgr(quality: float, weak: float, strong: float) -> float:
    if abs(strong - weak) < EPS:
        raise InvalidRequest(
            f"PGR is undefined: the strong and weak qualities are equal ({strong:.4f})"
        )
    return (quality - weak) / (strong - weak)


def envelope(points: Sequence[Point], weak: Point) -> list[Point]:
    """Corners of Q by ascending cost: the points (and the weak point) of higher quality than
    every cheaper one."""
    corners: list[Point] = []
    for p in sorted(set((*points, weak)), key=lambda p: (p[0], -p[1])):
        if not corners or p[1] > corners[-1][1] + EPS:
            corners.append(p)
    return corners


def _interpolate(corners: Sequence[Point], cost: float) -> float | None:
    if cost < corners[0][0] - EPS:
        return None
    for (c0, q0), (c1, q1) in zip(corners, corners[1:], strict=False):
        if cost <= c1:
            return q0 + (q1 - q0) * (cost - c0) / (c1 - c0)
    return corners[-1][1]


def quality_at(points: Sequence[Point], cost: float, weak: Point) -> float | None:
    """Q(cost) (module docstring); None when even the cheapest point costs more."""
    return _interpolate(envelope(points, weak), cost)


def apgr(points: Sequence[Point], weak: Point, strong: Point) -> float:
    """Mean PGR of the envelope over [c_weak, c_strong] (module docstring)."""
    lo, hi = weak[0], strong[0]
    if hi - lo <= EPS:
        raise InvalidRequest(f"APGR needs a strong cost above the weak one ({lo} >= {hi})")
    corners = envelope(points, weak)
    steps = sorted({lo, hi, *(c for c, _ in corners if lo < c < hi)})
    area = 0.0
    for left, right in zip(steps, steps[1:], strict=False):  # Q is linear on each piece
        q_left, q_right = _interpolate(corners, left), _interpolate(corners, right)
        mean = (pgr(q_left, weak[1], strong[1]) + pgr(q_right, weak[1], strong[1])) / 2
        area += mean * (right - left)
    return area / (hi - lo)


def cpt(points: Sequence[Point], weak: Point, strong: Point, target: float) -> float | None:
    """Smallest cost at which PGR(Q(c)) >= target (a fraction: 0.5 for CPT(50%))."""
    corners = envelope(points, weak)
    needed = weak[1] + target * (strong[1] - weak[1])  # quality giving PGR == target
    if strong[1] < weak[1]:
        raise InvalidRequest("CPT needs a strong quality above the weak one")
    pgr(needed, weak[1], strong[1])  # raises when the gap is empty
    if corners[0][1] >= needed - 1e-9:
        return corners[0][0]
    for (c0, q0), (c1, q1) in zip(corners, corners[1:], strict=False):
        if q1 >= needed - 1e-9:
            return c0 + (c1 - c0) * (needed - q0) / (q1 - q0)
    return None


def summarise(
    points: Sequence[Point], weak: Point, strong: Point, half_cost: float = 0.5
) -> dict[str, float | None]:
    """apgr, cpt50, cpt80 and `quality_at_half` = Q(half_cost) (costs relative to the strong
    policy's, so 0.5 is half of always-deepest's compute or half the requests on the cloud)."""
    try:
        out = {
            "apgr": apgr(points, weak, strong),
            "cpt50": cpt(points, weak, strong, 0.5),
            "cpt80": cpt(points, weak, strong, 0.8),
        }
    except InvalidRequest:  # weak == strong quality: no gap to recover
        out = {"apgr": None, "cpt50": None, "cpt80": None}
    out["quality_at_half"] = quality_at(points, half_cost, weak)
    return out
