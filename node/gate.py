"""The confidence gate: a request started at a shallow exit streams nothing until its first
token has been looked at. The measure the calibration chose for that exit (max_prob, margin,
entropy of the first token, or the trunk probe's agreement estimate) must clear the certified
threshold (`router.escalation.calibration`, `ruyiflow calibrate --risk`); otherwise the request
moves on at once to the next certified exit, else the deepest - by a branch switch when this
node serves it, else by a `hidden` handoff of the prompt's trunk - and is looked at again there.

Pure Python over the calibration (numpy only to build the probe's input); the worker does the
moving (`node.worker`). `open_gate` checks at start-up that the calibration and its probes were
made for the weights this node serves, and refuses them otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ruyiflow.cluster.calibration import CalibratedExit, Calibration, passes
from ruyiflow.cluster.topology import NodeSpec, Topology
from ruyiflow.engine.errors import ModelMismatch
from ruyiflow.engine.events import Confidence
from ruyiflow.node.probe import Probe, probe_input, probe_path, shipped_probes_dir

GATE = "gate"  # the reason of a move the gate made (metrics, the wire's HandoffReason)


@dataclass(frozen=True)
class GateCheck:
    """One look at one exit: what was compared and what followed (the route trace shows it)."""

    exit: int
    measure: str
    value: float | None  # None: no threshold here, so nothing was computed
    threshold: float | None  # None: nothing certified at this exit (never passes)
    passed: bool
    to_exit: int | None  # where the request goes when it did not pass
    confidence: Confidence  # the first token's, under this exit


class Gate:
    """The calibrated gate of one node (probes: exit -> loaded probe, where the calibration
    certified a probe threshold)."""

    def __init__(
        self,
        calibration: Calibration,
        model_exits: tuple[int, ...],
        probes: Mapping[int, Probe] | None = None,
    ) -> None:
        self.calibration = calibration
        self.model_exits = tuple(sorted(model_exits))
        self.probes = dict(probes or {})

    def applies(self, exit_layer: int) -> bool:
        """Whether requests starting at `exit_layer` are gated (every exit but the deepest)."""
        return exit_layer < self.model_exits[-1]

    def entry(self, exit_layer: int) -> CalibratedExit:
        return self.calibration.entry(exit_layer) or CalibratedExit(exit_layer)

    def check(
        self, exit_layer: int, confidence: Confidence, features: Callable[[], np.ndarray]
    ) -> GateCheck:
        """Look at a first token sampled at `exit_layer`; `features` gives the prompt's pooled
        boundary states (`Engine.prompt_features`), read only when a probe decides."""
        entry = self.entry(exit_layer)
        value: float | None = None
        if entry.threshold is not None:
            if entry.measure == "probe":
                x = probe_input(
                    features(), confidence.max_prob, confidence.margin, confidence.entropy
                )
                value = float(self.probes[exit_layer].predict(x)[0])
            else:
                value = float(getattr(confidence, entry.measure))
        passed = value is not None and passes(entry.measure, value, entry.threshold)
        to_exit = None if passed else self.calibration.next_exit(exit_layer, self.model_exits)
        if value is not None and not math.isfinite(value):
            value = None
        return GateCheck(
            exit_layer, entry.measure, value, entry.threshold, passed, to_exit, confidence
        )


def probes_dir(topology: Topology, spec: NodeSpec) -> Path | None:
    """Where the calibration's probes are: its `probes`, else the embedded model's shipped
    ones (None: nowhere)."""
    calibration = topology.router.escalation.calibration
    if calibration is not None and calibration.probes:
        return Path(calibration.probes).expanduser()
    return shipped_probes_dir() if topology.model(spec.model).is_embedded else None


def open_gate(
    topology: Topology, spec: NodeSpec, fingerprint: str, model_exits: tuple[int, ...]
) -> Gate | None:
    """The gate of node `spec` (None without a calibration, or for another model than the
    routed one). Raises ModelMismatch when the calibration, or a probe it names, was made for
    other weights - a node never gates with thresholds certified for another model."""
    calibration = topology.router.escalation.calibration
    if calibration is None or spec.model != topology.routed_model:
        return None
    if calibration.fingerprint != fingerprint:
        raise ModelMismatch(
            f"router.escalation.calibration in {topology.source} was made for model "
            f"{calibration.fingerprint}; node {spec.name!r} serves {fingerprint}. Calibrate "
            "again for these weights (`ruyiflow calibrate --risk EPS --write`) or remove it"
        )
    probes = {}
    for entry in calibration.exits:
        if entry.measure != "probe" or entry.threshold is None or entry.exit not in spec.exits:
            continue
        directory = probes_dir(topology, spec)
        path = probe_path(directory, entry.exit) if directory else None
        if path is None or not path.is_file():
            raise ModelMismatch(
                f"the calibration gates exit {entry.exit} with probe {path}, which does not exist"
            )
        probe = Probe(path, fingerprint)
        if probe.digest != entry.probe:
            raise ModelMismatch(
                f"probe {path} (digest {probe.digest}) is not the one exit {entry.exit} was "
                f"calibrated with ({entry.probe}); calibrate again"
            )
        probes[entry.exit] = probe
    return Gate(calibration, model_exits, probes)
