"""The gate's decision, without a model: pass or move on by the calibrated measure, the cascade
to the next certified exit, probes read only when they decide, and start-up refusal of a
calibration (or probe) made for other weights."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from ruyiflow.cluster.calibration import CalibratedExit, Calibration
from ruyiflow.cluster.topology import Topology
from ruyiflow.engine.errors import ModelMismatch
from ruyiflow.engine.events import Confidence
from ruyiflow.node.gate import Gate, open_gate

EXITS = (12, 16, 20, 24, 29)
REPO_TOPOLOGY = Path(__file__).parents[2] / "topology.yaml"


def calibration(*entries: CalibratedExit, fingerprint: str = "fp") -> Calibration:
    return Calibration(0.05, 0.1, 100, "2026-12-03", fingerprint, entries)


class FakeProbe:
    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0

    def predict(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        assert x.shape == (2 * 4 + 3,)
        return np.array([self.value])


def no_features() -> np.ndarray:
    raise AssertionError("features read for a decision that does not need them")


def test_passes_or_moves_on_by_the_calibrated_measure() -> None:
    gate = Gate(
        calibration(
            CalibratedExit(12, "max_prob", 0.8),
            CalibratedExit(16, "entropy", 1.0),
            CalibratedExit(20, "margin", None),
        ),
        EXITS,
    )
    sure, unsure = Confidence(0.9, 0.85, 0.3), Confidence(0.5, 0.1, 2.5)
    ok = gate.check(12, sure, no_features)
    assert ok.passed and ok.to_exit is None and ok.value == pytest.approx(0.9)
    moved = gate.check(12, unsure, no_features)
    assert not moved.passed and moved.to_exit == 16  # the next certified exit
    assert gate.check(16, sure, no_features).passed  # entropy 0.3 <= 1.0
    low = gate.check(16, unsure, no_features)
    assert not low.passed and low.to_exit == 29  # 20 and 24 certified nothing
    never = gate.check(20, sure, no_features)
    assert not never.passed and never.value is None and never.to_exit == 29
    assert gate.applies(24) and not gate.applies(29)


def test_probe_is_read_only_when_it_decides() -> None:
    probe = FakeProbe(0.7)
    gate = Gate(
        calibration(
            CalibratedExit(12, "probe", 0.6, "d1"), CalibratedExit(16, "probe", None, "d2")
        ),
        EXITS,
        {12: probe},
    )
    features = np.zeros(8, np.float32)
    check = gate.check(12, Confidence(0.2, 0.1, 3.0), lambda: features)
    assert check.passed and check.value == pytest.approx(0.7) and probe.calls == 1
    assert not gate.check(16, Confidence(0.99, 0.98, 0.1), no_features).passed


def test_open_gate_refuses_a_calibration_for_other_weights() -> None:
    shipped = Topology.load(REPO_TOPOLOGY)
    cal = calibration(CalibratedExit(12, "max_prob", 0.9), fingerprint="0123456789abcdef01234567")
    escalation = dataclasses.replace(shipped.router.escalation, calibration=cal)
    topology = dataclasses.replace(
        shipped, router=dataclasses.replace(shipped.router, escalation=escalation)
    )
    edge = topology.node("edge-0")
    with pytest.raises(ModelMismatch, match="was made for model 0123456789abcdef01234567"):
        open_gate(topology, edge, "another-fingerprint", EXITS)
    gate = open_gate(topology, edge, cal.fingerprint, EXITS)
    assert gate is not None and gate.calibration == cal
    probe_cal = calibration(CalibratedExit(12, "probe", 0.5, "not-the-digest"), fingerprint="fp")
    escalation = dataclasses.replace(escalation, calibration=probe_cal)
    topology = dataclasses.replace(
        topology, router=dataclasses.replace(topology.router, escalation=escalation)
    )
    with pytest.raises(ModelMismatch):  # the shipped probe is for other weights / digest
        open_gate(topology, edge, "fp", EXITS)


def test_a_node_refuses_to_start_with_a_calibration_for_other_weights(tmp_path) -> None:
    """`ruyiflow edge` exits with one clear line, before it serves anything."""
    import subprocess
    import sys

    from ruyiflow.local_cluster import write_topology

    path = tmp_path / "topology.yaml"
    write_topology(path)
    text = path.read_text().replace(
        "  escalation: {enabled: false, window: 4, threshold: 0.3}\n",
        "  escalation:\n    calibration: {eps: 0.05, delta: 0.1, n: 9, date: x, "
        "fingerprint: 0123456789abcdef01234567}\n",
    )
    path.write_text(text)
    run = subprocess.run(
        [sys.executable, "-m", "ruyiflow", "edge", "--name", "edge-0", "--topology", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ruyiflow edge: error: router.escalation.calibration in")
    assert "was made for model 0123456789abcdef01234567" in last
