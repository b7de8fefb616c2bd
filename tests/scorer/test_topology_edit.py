"""`calibrate --write`: the thresholds and escalation values change in place whatever the
layout, comments outside the thresholds list survive, and the result parses to what was meant."""

from __future__ import annotations

import dataclasses

import pytest

from ruyiflow.cluster.router_spec import EscalationSpec, Threshold
from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.scorer.topology_edit import RouterUpdate, fragment, redumped, update_topology_text

HEAD = """# head comment
models:
  m: {path: smollm2, extra_exits: [12, 16, 20, 24]}
nodes:
  - {name: edge-0, tier: edge, listen: '127.0.0.1:1', metrics: '127.0.0.1:2', model: m,
     exits: [12, 16]}
  - {name: cloud-0, tier: cloud, listen: '127.0.0.1:3', metrics: '127.0.0.1:4', model: m,
     exits: [20, 29]}
router:
  listen: 127.0.0.1:5   # router comment
  metrics: 127.0.0.1:6
"""
FLOW = "  thresholds: [{below: 0.4, exit: 12}, {below: 0.6, exit: 20}, {exit: 29}]  # flow\n"
BLOCK = """  thresholds:
    - below: 0.4
      exit: 12
    # inside the list
    - below: 0.6
      exit: 20
    - exit: 29
"""
ESCALATION = "  escalation:\n    window: 2        # two tokens\n"
TAIL = "  grace_period_s: 3   # tail comment\n"
NEW = (Threshold(12, 0.25), Threshold(20, 0.75), Threshold(29))


@pytest.mark.parametrize("thresholds", [FLOW, BLOCK])
@pytest.mark.parametrize("escalation", ["", ESCALATION, "  escalation: {window: 2}\n"])
def test_layouts_are_edited_in_place(thresholds, escalation) -> None:
    text = HEAD + thresholds + escalation + TAIL
    topology = parse_topology(text)
    spec = dataclasses.replace(topology.router.escalation, threshold=0.45)
    updated = update_topology_text(text, topology, RouterUpdate(NEW, spec))
    assert updated.kept_comments
    after = parse_topology(updated.text)
    assert after.router.thresholds == NEW and after.router.escalation == spec
    assert after.nodes == topology.nodes and after.router.grace_period_s == 3
    for comment in ("# head comment", "# router comment", "# tail comment"):
        assert comment in updated.text
    if "two tokens" in escalation:
        assert "# two tokens" in updated.text


def test_thresholds_only_and_fragment() -> None:
    text = HEAD + BLOCK + TAIL
    topology = parse_topology(text)
    updated = update_topology_text(text, topology, RouterUpdate(NEW))
    assert parse_topology(updated.text).router.escalation == topology.router.escalation
    assert "# inside the list" not in updated.text  # comments inside the old list are lost
    fallback = parse_topology(redumped(text, RouterUpdate(NEW, EscalationSpec(True, 4, 0.5))))
    assert fallback.router.thresholds == NEW and fallback.router.escalation.threshold == 0.5
    update = RouterUpdate(NEW, EscalationSpec(True, 4, 0.5), {"grace_period_s": 2.5})
    assert fragment(update).splitlines() == [
        "router:",
        "  grace_period_s: 2.5",
        "  thresholds:",
        "    - {below: 0.25, exit: 12}",
        "    - {below: 0.75, exit: 20}",
        "    - {exit: 29}",
        "  escalation:",
        "    enabled: true",
        "    window: 4",
        "    threshold: 0.5",
    ]


@pytest.mark.parametrize("tail", [TAIL, ""])
def test_router_scalars_are_replaced_or_added(tail) -> None:
    # grace_period_s stands in for any plain router field (e.g. target_cloud_share)
    text = HEAD + BLOCK + ESCALATION + tail
    topology = parse_topology(text)
    updated = update_topology_text(text, topology, RouterUpdate(NEW, None, {"grace_period_s": 7.5}))
    assert updated.kept_comments
    assert parse_topology(updated.text).router.grace_period_s == 7.5
    assert ("# tail comment" in updated.text) == bool(tail)


@pytest.mark.parametrize(
    "escalation",
    [
        "",
        ESCALATION,
        "  escalation: {window: 2}\n",
        "  escalation:\n    window: 2\n"
        "    calibration: {eps: 0.3, delta: 0.3, n: 1, date: x, fingerprint: old}  # old\n",
    ],
)
def test_calibration_is_written_under_escalation(escalation) -> None:
    from ruyiflow.cluster.calibration import CalibratedExit, Calibration

    text = HEAD + BLOCK + escalation + TAIL
    topology = parse_topology(text)
    cal = Calibration(
        0.05,
        0.1,
        109,
        "2026-12-03",
        "fp",
        (CalibratedExit(12, "probe", None, "ab"), CalibratedExit(20, "entropy", 1.25)),
    )
    updated = update_topology_text(text, topology, RouterUpdate(None, calibration=cal))
    after = parse_topology(updated.text)
    assert after.router.escalation.calibration == cal
    assert after.router.thresholds == topology.router.thresholds
    assert after.router.escalation.window == topology.router.escalation.window
    assert updated.kept_comments == ("{" not in escalation.split("\n")[0])  # flow: re-dumped
    if updated.kept_comments:
        assert "# head comment" in updated.text and "# tail comment" in updated.text
    assert "calibration:" in fragment(RouterUpdate(None, calibration=cal))
