"""Policies with the confidence gate, evaluated from `eval exits` results and their first-token
features, with the nodes' own gate (`node.gate.Gate`) and the router's own plan
(`router.policy.plan_route`):

- `default`: what a topology does - its scorer and thresholds, the start at the next certified
  exit, the calibrated gate at each exit as its nodes open it (`node.gate.open_gate`: the same
  refusal of another model's calibration or probes), a failing look moving the request on
  before it streams, then the served exit's tokens (with mid-stream escalation where the
  topology has it and escalation runs with its settings are given: modelled as the
  `+escalation` policies do, to the deepest exit, where a node would go to the next deeper
  one). Exact when every prompt ends at the deepest exit; otherwise, without those runs, the
  point's setting says that mid-stream escalation was not modelled;
- `<measure>-gate`: every request starts at the shallowest exit and a gate on one measure
  (`probe`, `max_prob`) with one threshold at every exit moves it on; the curve sweeps that
  threshold. `<scorer>+probe-gate`: the scorer's exit first, then the probe gate.

Compute in layer-rows (`evaluation.runner`): a look that fails at e wastes e's branch layer
over the prompt and the refed last token; the switch to e' computes layers e..e'-1 and the
branch of e' over the prompt's cached positions: starting at e0 and served at s after moves
e0 -> e1 -> ... -> s costs (e0+1) P + sum_i [(e_i - e_{i-1} + 1)(P - 1) + e_i + 1] for the
prompt where serving at s alone costs (s+1) P.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ruyiflow.cluster.calibration import CalibratedExit, Calibration
from ruyiflow.cluster.topology import Topology
from ruyiflow.engine.events import Confidence
from ruyiflow.evaluation.features import FirstTokens
from ruyiflow.evaluation.policies import Evaluator, OperatingPoint, Outcome, PolicyCurve
from ruyiflow.evaluation.results import PromptResult
from ruyiflow.node.gate import Gate, open_gate
from ruyiflow.router.policy import plan_route


def prompt_overhead(path: Sequence[int], num_prompt: int) -> int:
    """Extra layer-rows of the gate's moves along `path` (start, ..., served exit) over
    prefilling the served exit directly (module docstring)."""
    cost = (path[0] + 1) * num_prompt
    for before, after in zip(path, path[1:], strict=False):
        cost += (after - before + 1) * (num_prompt - 1) + after + 1
    return cost - (path[-1] + 1) * num_prompt


def gate_path(gate: Gate, table: FirstTokens, prompt_id: str, start: int) -> list[int]:
    """The exits a request started at `start` visits: the gate's moves, then the served one."""
    path = [start]
    while gate.applies(path[-1]):
        i, j = table.row(prompt_id), table.column(path[-1])
        conf = Confidence(
            float(table.max_prob[i, j]), float(table.margin[i, j]), float(table.entropy[i, j])
        )
        check = gate.check(path[-1], conf, lambda i=i, j=j: table.pooled[i, j])
        if check.passed or check.to_exit is None:
            break
        path.append(check.to_exit)
    return path


def gated_outcomes(
    ev: Evaluator,
    results: Sequence[PromptResult],
    starts: Mapping[str, int],
    gate: Gate | None,
    table: FirstTokens | None,
    escalated: Mapping[str, Mapping[int, Outcome]] | None = None,
) -> list[Outcome]:
    """Each prompt's outcome when started at `starts[id]` behind `gate` (None: no gate)."""
    chosen = []
    for r in results:
        path = [starts[r.id]] if gate is None else gate_path(gate, table, r.id, starts[r.id])
        served = path[-1]
        outcomes = escalated[r.id] if escalated is not None else ev.outcomes[r.id]
        base = outcomes[served]
        extra = prompt_overhead(path, r.num_prompt_tokens or 0)
        chosen.append(
            Outcome(base.compute + extra, base.final_exit, base.agreement, base.answer_match)
        )
    return chosen


def topology_gate(topology: Topology, fingerprint: str, model_exits: Sequence[int]) -> Gate | None:
    """The gate the topology's nodes open for weights `fingerprint` (None: no calibration),
    with every node's probes; raises ModelMismatch where a node would refuse to start."""
    calibration = topology.router.escalation.calibration
    if calibration is None:
        return None
    exits = tuple(sorted(model_exits))
    probes = {}
    for spec in topology.nodes:
        gate = open_gate(topology, spec, fingerprint, exits)
        if gate is not None:
            probes.update(gate.probes)
    return Gate(calibration, exits, probes)


def default_point(
    ev: Evaluator,
    results: Sequence[PromptResult],
    topology: Topology,
    scores: Mapping[str, float],
    table: FirstTokens | None,
    gate: Gate | None,
    escalated: Mapping[str, Mapping[int, Outcome]] | None,
) -> tuple[PolicyCurve, list[Outcome]]:
    """The `default` policy: exactly the topology's routing (module docstring). `gate` is
    `topology_gate`'s; `escalated` the escalation runs' outcomes with the topology's settings
    (None: not run)."""
    escalation = topology.router.escalation
    gate = gate if escalation.enabled else None  # nodes gate only with escalation on
    starts = {r.id: plan_route(topology, scores[r.id]).exit for r in results}
    use = escalated if escalation.enabled else None
    chosen = gated_outcomes(ev, results, starts, gate, table, use)
    setting = "topology"
    if (
        escalation.enabled
        and escalated is None
        and any(o.final_exit < ev.exits[-1] for o in chosen)
    ):
        setting = "topology, mid-stream escalation not modelled (no escalation runs)"
    return PolicyCurve("default", (ev.point(chosen, setting),)), chosen


def sweep_calibration(exits: Sequence[int], measure: str, threshold: float) -> Calibration:
    """A gate with one measure and threshold at every shallow exit (a sweep's setting)."""
    entries = tuple(
        CalibratedExit(e, measure, threshold, "sweep" if measure == "probe" else None)
        for e in exits[:-1]
    )
    return Calibration(0.5, 0.5, 1, "sweep", "sweep", entries)


def gate_sweep(
    name: str,
    ev: Evaluator,
    results: Sequence[PromptResult],
    starts: Mapping[str, int],
    measure: str,
    values: np.ndarray,
    table: FirstTokens,
    probes: Mapping[int, object],
    num_points: int = 41,
) -> PolicyCurve:
    """One point per threshold: `num_points` quantiles of the measure's `values`, plus passing
    everything and nothing."""
    exits = tuple(results[0].exits)
    grid = sorted({-np.inf, np.inf, *np.quantile(values, np.linspace(0, 1, num_points))})
    points: list[OperatingPoint] = []
    for threshold in grid:
        t = float(np.clip(threshold, -1e9, 1e9))  # a Calibration wants a finite threshold
        gate = Gate(sweep_calibration(exits, measure, t), exits, probes)
        chosen = gated_outcomes(ev, results, starts, gate, table)
        points.append(ev.point(chosen, f"{measure}>={t:.4g}"))
    return PolicyCurve(name, tuple(points))
