"""Gate policies on hand-built results: the `default` policy follows the topology (router skip,
the nodes' gate as they open it, escalation on or off, compute of the gate's moves) and refuses
what a node would refuse, the sweeps run from passing nothing to passing everything, and the
summary lines report the realised disagreement against eps."""

from __future__ import annotations

import numpy as np
import pytest

from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.engine.errors import ModelMismatch
from ruyiflow.evaluation.features import FirstTokens
from ruyiflow.evaluation.gate_policy import (
    default_point,
    gate_sweep,
    prompt_overhead,
    topology_gate,
)
from ruyiflow.evaluation.gate_setup import default_lines
from ruyiflow.evaluation.policies import Evaluator, Outcome
from ruyiflow.evaluation.prompts import Prompt
from ruyiflow.evaluation.results import build_result
from ruyiflow.evaluation.routing import GateEval, policy_curves
from ruyiflow.node.probe import load_probes, shipped_probes_dir

# 10 prompt tokens; layer-rows (exit + 1) x (10 + generated - 1), as in test_policies
RUNS = {
    "a": {12: ([1, 2, 3], "x", [0.9] * 3), 29: ([1, 2, 3], "x", [0.9] * 3)},
    "b": {12: ([5, 6], "y", [0.5] * 2), 29: ([7, 6, 8, 9], "y", [0.9] * 4)},
    "c": {12: ([1], "five", [0.2]), 29: ([2], "4", [0.9])},
}
DEEP = 360 + 390 + 300
SHIPPED_FINGERPRINT = "1fa35b6ed91ae6b0d4cbfba9"  # the embedded model's, which the probes name
FIRST_MAX_PROB = {"a": 0.95, "b": 0.4, "c": 0.3}  # exit 12's first-token confidence
WASTE = 10 + 12  # a failed look at 12: its branch layer over 10 prompt tokens, 12 refed rows

TOPOLOGY = """
models: {m: {path: smollm2, extra_exits: [12]}}
nodes:
  - {name: e, tier: edge, listen: '127.0.0.1:1', metrics: '127.0.0.1:2', model: m, exits: [12]}
  - {name: c, tier: cloud, listen: '127.0.0.1:3', metrics: '127.0.0.1:4', model: m, exits: [29]}
router:
  listen: 127.0.0.1:5
  metrics: 127.0.0.1:6
  http: ''
  thresholds: [{below: 0.5, exit: 12}, {exit: 29}]
  escalation:
    enabled: true
    calibration:
      {eps: 0.3, delta: 0.1, n: 50, date: x, fingerprint: fp,
       exits: [{exit: 12, measure: max_prob, threshold: THRESHOLD}]}
"""


def results():
    prompts = {
        "a": Prompt("a", "chat", "hello"),
        "b": Prompt("b", "chat", "hi there"),
        "c": Prompt("c", "arithmetic", "2+2?", "4"),
    }
    return [build_result(prompts[k], RUNS[k], 10, "fp", 4) for k in "abc"]


def table() -> FirstTokens:
    ids = ("a", "b", "c")
    max_prob = np.array([[FIRST_MAX_PROB[i]] for i in ids], np.float32)
    return FirstTokens(
        ids,
        (12,),
        np.zeros((3, 1), np.int64),
        max_prob,
        max_prob / 2,
        1 - max_prob,
        np.zeros((3, 1, 4), np.float32),
        "fp",
    )


def test_prompt_overhead() -> None:
    assert prompt_overhead([12], 10) == 0 and prompt_overhead([29], 10) == 0
    assert prompt_overhead([12, 29], 10) == WASTE
    assert prompt_overhead([12, 16, 29], 10) == (13 * 10 + 5 * 9 + 17 + 14 * 9 + 30) - 300


def topology(threshold: str = "0.6", enabled: str = "true"):
    text = TOPOLOGY.replace("THRESHOLD", threshold)
    return parse_topology(text.replace("enabled: true", f"enabled: {enabled}"))


def default(topo, scores, escalated=None):
    gate = topology_gate(topo, "fp", (12, 29))
    return default_point(Evaluator(results()), results(), topo, scores, table(), gate, escalated)


SCORES = {"a": 0.1, "b": 0.1, "c": 0.9}  # a, b routed to 12; c to 29


def test_default_follows_the_gate() -> None:
    curve, chosen = default(topology(), SCORES)
    assert [o.final_exit for o in chosen] == [12, 29, 29]  # b fails the gate at 12
    (point,) = curve.points
    assert point.compute == pytest.approx((156 + 390 + WASTE + 300) / DEEP)
    assert point.agreement == 1.0 and point.answer_accuracy == 1.0  # a agrees at 12
    assert "mid-stream escalation not modelled" in point.setting  # a stays at 12


def test_default_takes_the_escalation_runs() -> None:
    # a escalates mid-stream from 12 (as the `+escalation` policies model it)
    escalated = {
        r.id: {12: Outcome(200, 29, 0.5, None), 29: Outcome(0, 29, 1.0, None)} for r in results()
    }
    curve, chosen = default(topology(), SCORES, escalated)
    assert chosen[0] == Outcome(200, 29, 0.5, None) and curve.points[0].setting == "topology"


def test_escalation_off_means_no_gate_and_no_skip() -> None:
    # the nodes gate and the router skips uncertified exits only with escalation on
    for threshold in ("0.6", "null"):
        curve, chosen = default(topology(threshold, enabled="false"), SCORES)
        assert [o.final_exit for o in chosen] == [12, 12, 29]
        assert curve.points[0].compute == pytest.approx((156 + 143 + 300) / DEEP)


def test_refuses_what_a_node_refuses() -> None:
    with pytest.raises(ModelMismatch, match="was made for model fp"):
        topology_gate(topology(), "other-weights", (12, 29))
    # a probe threshold whose probe is not the shipped one (nodes check the digest)
    probe = "exits: [{exit: 12, measure: probe, threshold: 0.5, probe: 'bad'}]"
    text = TOPOLOGY.replace("exits: [{exit: 12, measure: max_prob, threshold: THRESHOLD}]", probe)
    (shipped,) = load_probes(shipped_probes_dir(), (12,), SHIPPED_FINGERPRINT).values()
    text = text.replace("fingerprint: fp", f"fingerprint: {SHIPPED_FINGERPRINT}")
    with pytest.raises(ModelMismatch, match="is not the one exit 12 was calibrated with"):
        topology_gate(parse_topology(text), SHIPPED_FINGERPRINT, (12, 29))
    gate = topology_gate(
        parse_topology(text.replace("bad", shipped.digest)),
        SHIPPED_FINGERPRINT,
        (12, 29),
    )
    assert gate.probes[12].digest == shipped.digest


def test_nothing_certified_is_always_deepest() -> None:
    curve, chosen = default(topology("null"), dict.fromkeys("abc", 0.1))
    assert [o.final_exit for o in chosen] == [29, 29, 29]  # the router skips 12: no waste
    assert curve.points[0].compute == 1.0 and curve.points[0].setting == "topology"


def test_curves_and_summary_lines() -> None:
    topo = topology()
    gate = GateEval(table(), {}, topo, SCORES, topology_gate(topo, "fp", (12, 29)))
    scorers = {"heuristic": {"a": 0.1, "b": 0.6, "c": 0.9}}
    curves = policy_curves(results(), scorers, None, gate=gate)
    assert [c.name for c in curves][:2] == ["default", "max_prob-gate"]
    sweep = curves[1]
    computes = sorted(round(p.compute * DEEP) for p in sweep.points)
    assert computes[0] == 156 + 143 + 130  # everything passes at 12
    assert computes[-1] == DEEP + 3 * WASTE  # nothing passes: every look wasted
    lines = default_lines(curves, gate)
    assert (
        lines[0] == "default: realised disagreement 0.0000 vs calibrated eps 0.3 (delta 0.1, n 50)"
    )
    assert "100.0% of always-deepest's 1.0000" in lines[1]
    assert lines[3].startswith("default: APGR ") and "random at matched cost" in lines[3]


def test_sweep_without_probes_skips_probe_curves() -> None:
    ev = Evaluator(results())
    starts = dict.fromkeys("abc", 12)
    values = np.array([[0.95], [0.4], [0.3]])
    curve = gate_sweep("max_prob-gate", ev, results(), starts, "max_prob", values, table(), {})
    assert len({p.setting for p in curve.points}) == len(curve.points) >= 3


def test_the_shipped_calibration_is_for_the_shipped_weights_and_probes(smollm2) -> None:
    """What `default` reports for the shipped topology is what its nodes run: the calibration
    names the embedded model's weights (overlay included) and digests of the shipped probes."""
    from pathlib import Path

    from ruyiflow.cluster.topology import Topology

    shipped = Topology.load(Path(__file__).parents[2] / "topology.yaml")
    cal = shipped.router.escalation.calibration
    assert cal is not None and cal.fingerprint == smollm2.fingerprint == SHIPPED_FINGERPRINT
    exits = tuple(smollm2.config.exits)
    probes = load_probes(shipped_probes_dir(), exits[:-1], cal.fingerprint)
    assert {e.exit: e.probe for e in cal.exits} == {e: p.digest for e, p in probes.items()}
    gate = topology_gate(shipped, smollm2.fingerprint, exits)
    assert gate is not None and gate.calibration == cal
