"""`eval routing` as a function: per-exit results (+ escalation runs) → one curve per policy.

Policies, all on the same prompts: always-shallowest, always-deepest, random (deepest with
probability p, averaged over seeds), oracle-label (each prompt at its label exit), and for each
scorer (v1 `heuristic`, `learned` when a model file is given) a threshold sweep, plain and with
escalation (start at the routed exit, switch to the deepest exit when the confidence window
fires, really run with Engine.switch_exit), and `<scorer>-2exit`: the same scores with one cut
between the shallowest and the deepest exit (RouteLLM's weak/strong setting, comparable with
`random` at matched cost). With first-token features (`GateEval`): `default`, what a topology
does (scorer, thresholds, calibrated gate, escalation), and the gate sweeps
(`evaluation.gate_policy`): `probe-gate`, `max_prob-gate` and `<scorer>+probe-gate`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ruyiflow.engine.errors import InvalidRequest, RuyiflowError
from ruyiflow.evaluation.policies import (
    DEFAULT_CLOUD_ABOVE,
    Evaluator,
    PolicyCurve,
    default_thresholds,
    escalation_outcomes,
)
from ruyiflow.evaluation.prompts import Prompt
from ruyiflow.evaluation.results import PromptResult
from ruyiflow.node.escalation import EscalationSettings


@dataclass(frozen=True)
class RoutingSetup:
    """Router settings the evaluation mirrors (defaults: the default topology.yaml)."""

    thresholds: tuple[tuple[float, int], ...] | None = None  # None: default_thresholds(exits)
    # topology.yaml's escalation, calibrated on the trained exits (`ruyiflow calibrate`)
    escalation: EscalationSettings = EscalationSettings(enabled=True, window=4, threshold=0.075)
    cloud_above: int = DEFAULT_CLOUD_ABOVE
    num_seeds: int = 200

    @classmethod
    def from_topology(cls, path: str, **overrides) -> RoutingSetup:
        from ruyiflow.cluster.errors import TopologyError
        from ruyiflow.cluster.topology import Topology

        try:
            topo = Topology.load(path)
        except (TopologyError, OSError) as exc:
            raise InvalidRequest(f"topology {path}: {exc}") from exc
        model = topo.routed_model
        edge = [e for n in topo.nodes if n.model == model and n.tier == "edge" for e in n.exits]
        esc = topo.router.escalation
        fields = {
            "thresholds": tuple((t.below, t.exit) for t in topo.router.thresholds),
            "escalation": EscalationSettings(
                enabled=True, window=esc.window, threshold=esc.threshold
            ),
            "cloud_above": max(edge, default=0),
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


@dataclass(frozen=True)
class GateEval:
    """What the gate policies need: first-token features of the prompts, the probes of the
    sweeps (exit -> `node.probe.Probe`), and for `default` a topology, its scorer's scores by
    prompt id and the gate its nodes open (`gate_policy.topology_gate`)."""

    table: Any  # evaluation.features.FirstTokens
    probes: Mapping[int, Any] = field(default_factory=dict)
    topology: Any = None  # cluster.topology.Topology
    default_scores: Mapping[str, float] | None = None
    default_gate: Any = None  # node.gate.Gate


def match_results(prompts: Sequence[Prompt], results: Sequence[PromptResult]) -> list[PromptResult]:
    """The result of every prompt, in prompt order; results of other prompts are ignored."""
    by_id = {r.id: r for r in results}
    missing = [p.id for p in prompts if p.id not in by_id]
    if missing:
        raise InvalidRequest(
            f"{len(missing)} prompts have no result (e.g. {missing[:5]}); run `eval exits` on them"
        )
    for p in prompts:
        if by_id[p.id].prompt.prompt != p.prompt:
            raise InvalidRequest(f"prompt {p.id!r} differs from its result's prompt text")
    return [by_id[p.id] for p in prompts]


def score_prompts(scorer, prompts: Sequence[Prompt]) -> dict[str, float]:
    scores = {}
    for p in prompts:
        s = float(scorer.score(p.conversation()))
        if not 0.0 <= s <= 1.0:
            raise RuyiflowError(f"scorer gave {s} for {p.id!r}, outside [0, 1]")
        scores[p.id] = s
    return scores


def policy_curves(
    results: Sequence[PromptResult],
    scorers: Mapping[str, Mapping[str, float]],
    escalation_runs: Mapping | None,
    setup: RoutingSetup = RoutingSetup(),
    gate: GateEval | None = None,
) -> list[PolicyCurve]:
    """Every policy's curve. `scorers` maps a name to its scores by prompt id; with
    `escalation_runs` ({(id, start exit): Run}) each scorer also gets a `+escalation` curve;
    with `gate` the gate policies come first (`default` first of all, given a topology)."""
    ev = Evaluator(results, setup.cloud_above)
    thresholds = setup.thresholds or tuple(default_thresholds(ev.exits))
    curves = [
        ev.fixed("always-shallowest", ev.exits[0]),
        ev.fixed("always-deepest", ev.exits[-1]),
        ev.random(num_seeds=setup.num_seeds),
        ev.by_exit("oracle-label", {r.id: r.label_exit for r in results}),
    ]
    escalated = escalation_outcomes(results, escalation_runs) if escalation_runs else None
    # RouteLLM's two-model setting: one cut between the shallowest and the deepest exit
    two_exits = ((0.5, ev.exits[0]), (float("inf"), ev.exits[-1]))
    for name, scores in scorers.items():
        curves.append(ev.thresholds_sweep(name, scores, thresholds))
        curves.append(ev.thresholds_sweep(f"{name}-2exit", scores, two_exits))
        if escalated is not None:
            curves.append(ev.thresholds_sweep(f"{name}+escalation", scores, thresholds, escalated))
    if gate is not None:
        curves = _gate_curves(ev, results, scorers, thresholds, escalated, setup, gate) + curves
    return curves


def _gate_curves(
    ev, results, scorers, thresholds, escalated, setup: RoutingSetup, gate: GateEval
) -> list[PolicyCurve]:
    from ruyiflow.evaluation.features import gate_data
    from ruyiflow.evaluation.gate_policy import default_point, gate_sweep
    from ruyiflow.evaluation.policies import route_exit

    out = []
    if gate.topology is not None:
        esc = gate.topology.router.escalation
        if (setup.escalation.window, setup.escalation.threshold) != (esc.window, esc.threshold):
            escalated = None  # runs with other settings than the topology's: not its escalation
        curve, _ = default_point(
            ev,
            results,
            gate.topology,
            gate.default_scores,
            gate.table,
            gate.default_gate,
            escalated,
        )
        out.append(curve)
    measures = gate_data(results, gate.table, gate.probes).measures
    shallowest = {r.id: ev.exits[0] for r in results}
    for measure in ("probe", "max_prob"):
        if measure in measures:
            name = f"{measure}-gate"
            values = measures[measure]
            out.append(
                gate_sweep(name, ev, results, shallowest, measure, values, gate.table, gate.probes)
            )
    if "probe" in measures:
        for name, scores in scorers.items():
            starts = {r.id: route_exit(scores[r.id], thresholds) for r in results}
            out.append(
                gate_sweep(
                    f"{name}+probe-gate",
                    ev,
                    results,
                    starts,
                    "probe",
                    measures["probe"],
                    gate.table,
                    gate.probes,
                )
            )
    return out


def load_scorer(name: str, path: str | None = None):
    """The heuristic v1 scorer, or the learned one from `path` (router.learned_scorer)."""
    if name == "heuristic":
        from ruyiflow.router.scorer import HeuristicScorer

        return HeuristicScorer()
    try:
        from ruyiflow.router.learned_scorer import LearnedScorer
    except ImportError as exc:
        raise RuyiflowError(f"the learned scorer is not available ({exc})") from exc
    return LearnedScorer(path)
