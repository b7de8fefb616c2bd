"""Routing policies evaluated on the same prompts, each a curve of operating points.

An `Outcome` is what serving one prompt one way produced (compute, final exit, agreement with
always-deepest, answer match); a policy picks one outcome per prompt, and the mean over prompts
is an `OperatingPoint`:

- compute: sum of layer-rows (evaluation.runner) relative to always-deepest's sum;
- cloud_share: fraction of requests that end on an exit above `cloud_above` (default 16: the
  default topology's edge-0 serves 12 and 16, cloud-0 the rest);
- agreement: mean token agreement with always-deepest; answer_accuracy: answer match rate over
  prompts that have an answer.

Scorer policies map a difficulty score to an exit with router-style thresholds (`score <
below` → exit, the last catches the rest) shifted by t: `score < below + t`. Sweeping t over
every value where some prompt changes exit gives the curve, from all-deepest to all-shallowest;
t = 0 is the thresholds as configured (the `default` point). Random routing sends each prompt to
the deepest exit with probability p, else the shallowest (RouteLLM's random router), for p on a
grid, averaging many seeds per p.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation.results import PromptResult, agreement, answer_match

if TYPE_CHECKING:  # the runner imports torch; policies stay model-free
    from ruyiflow.evaluation.runner import Run

DEFAULT_CLOUD_ABOVE = 16
QUALITIES = ("agreement", "answer")


@dataclass(frozen=True)
class Outcome:
    compute: int  # layer-rows
    final_exit: int
    agreement: float
    answer_match: bool | None


@dataclass(frozen=True)
class OperatingPoint:
    setting: str  # what produced it: "shift=+0.10", "p=0.30", "exit=12", ...
    compute: float
    cloud_share: float
    agreement: float
    answer_accuracy: float | None

    def quality(self, name: str) -> float | None:
        return self.agreement if name == "agreement" else self.answer_accuracy

    def cost(self, axis: str) -> float:
        return self.compute if axis == "compute" else self.cloud_share

    def to_dict(self) -> dict[str, object]:
        return {
            "setting": self.setting,
            "compute": round(self.compute, 5),
            "cloud_share": round(self.cloud_share, 5),
            "agreement": round(self.agreement, 5),
            "answer_accuracy": None
            if self.answer_accuracy is None
            else round(self.answer_accuracy, 5),
        }


@dataclass(frozen=True)
class PolicyCurve:
    name: str
    points: tuple[OperatingPoint, ...]
    default: OperatingPoint | None = None  # the configured thresholds' point (scorer policies)


def exit_outcomes(results: Sequence[PromptResult]) -> dict[str, dict[int, Outcome]]:
    """{prompt id: {exit: Outcome}} of the plain per-exit runs."""
    table = {}
    for r in results:
        if r.num_prompt_tokens is None:
            raise InvalidRequest(f"result {r.id!r} lacks num_prompt_tokens; rerun `eval exits`")
        table[r.id] = {
            e: Outcome(
                (e + 1) * (r.num_prompt_tokens + len(x.token_ids) - 1),
                e,
                x.agreement,
                x.answer_match,
            )
            for e, x in r.exits.items()
        }
    return table


class Evaluator:
    """Turns one outcome per prompt into an OperatingPoint (costs relative to always-deepest)."""

    def __init__(self, results: Sequence[PromptResult], cloud_above: int = DEFAULT_CLOUD_ABOVE):
        if not results:
            raise InvalidRequest("no results to evaluate")
        self.ids = [r.id for r in results]
        self.exits = tuple(results[0].exits)
        self.outcomes = exit_outcomes(results)
        self.cloud_above = cloud_above
        self.deep_compute = sum(self.outcomes[i][self.exits[-1]].compute for i in self.ids)

    def point(self, chosen: Sequence[Outcome], setting: str) -> OperatingPoint:
        answered = [o.answer_match for o in chosen if o.answer_match is not None]
        return OperatingPoint(
            setting,
            sum(o.compute for o in chosen) / self.deep_compute,
            sum(o.final_exit > self.cloud_above for o in chosen) / len(chosen),
            sum(o.agreement for o in chosen) / len(chosen),
            sum(answered) / len(answered) if answered else None,
        )

    def fixed(self, name: str, exit_layer: int) -> PolicyCurve:
        chosen = [self.outcomes[i][exit_layer] for i in self.ids]
        return PolicyCurve(name, (self.point(chosen, f"exit={exit_layer}"),))

    def by_exit(self, name: str, exits: Mapping[str, int]) -> PolicyCurve:
        """One point: each prompt at the exit given for it (e.g. its label exit)."""
        chosen = [self.outcomes[i][exits[i]] for i in self.ids]
        return PolicyCurve(name, (self.point(chosen, name),))

    def random(
        self, name: str = "random", num_p: int = 21, num_seeds: int = 200, seed: int = 0
    ) -> PolicyCurve:
        """Deepest with probability p else shallowest; each p's point averages `num_seeds`."""
        weak = [self.outcomes[i][self.exits[0]] for i in self.ids]
        strong = [self.outcomes[i][self.exits[-1]] for i in self.ids]
        rng = np.random.default_rng(seed)
        points = []
        for p in np.linspace(0.0, 1.0, num_p):
            draws = rng.random((num_seeds, len(self.ids))) < p  # [seeds, prompts] True = strong
            pts = [
                self.point([s if d else w for d, w, s in zip(row, weak, strong, strict=True)], "")
                for row in draws
            ]
            points.append(_mean_point(pts, f"p={p:.2f}"))
        return PolicyCurve(name, tuple(points))

    def thresholds_sweep(
        self,
        name: str,
        scores: Mapping[str, float],
        thresholds: Sequence[tuple[float, int]],
        table: Mapping[str, Mapping[int, Outcome]] | None = None,
    ) -> PolicyCurve:
        """Shifted thresholds over `scores` (module docstring). `table` gives the outcome of
        starting prompt i at exit e (default: the plain per-exit runs; escalation runs when
        the policy escalates)."""
        table = self.outcomes if table is None else table
        for _, exit_layer in thresholds:
            if exit_layer not in self.exits:
                raise InvalidRequest(f"threshold exit {exit_layer} is not in {list(self.exits)}")
        cuts = [b for b, _ in thresholds[:-1]]
        breaks = sorted({scores[i] - c for i in self.ids for c in cuts})
        shifts = [breaks[0] - 1.0, *breaks, breaks[-1] + 1.0] if breaks else [0.0]
        seen: dict[tuple[int, ...], OperatingPoint] = {}
        for shift in shifts:
            route = tuple(route_exit(scores[i], thresholds, shift) for i in self.ids)
            if route not in seen:
                chosen = [table[i][e] for i, e in zip(self.ids, route, strict=True)]
                seen[route] = self.point(chosen, f"shift={shift:+.4f}")
        route = tuple(route_exit(scores[i], thresholds, 0.0) for i in self.ids)
        default = self.point(
            [table[i][e] for i, e in zip(self.ids, route, strict=True)], "shift=+0.0000"
        )
        return PolicyCurve(name, tuple(seen.values()), default)


def route_exit(score: float, thresholds: Sequence[tuple[float, int]], shift: float = 0.0) -> int:
    """The exit of the first (below, exit) with score < below + shift; the last takes the rest."""
    for below, exit_layer in thresholds[:-1]:
        if score < below + shift:
            return exit_layer
    return thresholds[-1][1]


def default_thresholds(exits: Sequence[int]) -> list[tuple[float, int]]:
    """Cuts evenly spaced over [0.35, 0.80], one per exit but the last (for SmolLM2's five exits
    exactly the default topology's 0.35 / 0.50 / 0.65 / 0.80)."""
    if len(exits) == 1:
        return [(math.inf, exits[0])]
    cuts = np.linspace(0.35, 0.80, len(exits) - 1) if len(exits) > 2 else [0.5]
    return [(float(c), e) for c, e in zip(cuts, exits[:-1], strict=True)] + [(math.inf, exits[-1])]


def frontier(points: Sequence[OperatingPoint], quality: str, axis: str) -> list[OperatingPoint]:
    """Points no cheaper point matches in quality, by ascending cost (the envelope's corners)."""
    best, out = -math.inf, []
    ranked = sorted(
        (p for p in points if p.quality(quality) is not None),
        key=lambda p: (p.cost(axis), -p.quality(quality)),
    )
    for p in ranked:
        if p.quality(quality) > best + 1e-12:
            best = p.quality(quality)
            out.append(p)
    return out


def _mean_point(points: Sequence[OperatingPoint], setting: str) -> OperatingPoint:
    answers = [p.answer_accuracy for p in points if p.answer_accuracy is not None]
    return OperatingPoint(
        setting,
        float(np.mean([p.compute for p in points])),
        float(np.mean([p.cloud_share for p in points])),
        float(np.mean([p.agreement for p in points])),
        float(np.mean(answers)) if answers else None,
    )


def escalation_outcomes(
    results: Sequence[PromptResult], runs: Mapping[tuple[str, int], Run]
) -> dict[str, dict[int, Outcome]]:
    """{prompt id: {start exit: Outcome}} of escalation runs (evaluation.runner.Run), scored
    against each prompt's deepest tokens; the deepest start exit is its plain run."""
    plain = exit_outcomes(results)
    table = {}
    for r in results:
        deepest = r.exits[r.deepest]
        row = {r.deepest: plain[r.id][r.deepest]}
        for e in r.exits:
            if e == r.deepest:
                continue
            if (r.id, e) not in runs:
                raise InvalidRequest(f"no escalation run for prompt {r.id!r} from exit {e}")
            run = runs[(r.id, e)]
            row[e] = Outcome(
                run.compute(),
                run.final_exit,
                agreement(run.token_ids, deepest.token_ids),
                answer_match(run.text, r.prompt.answers),
            )
        table[r.id] = row
    return table
