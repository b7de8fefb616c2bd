"""The risk calibration of the confidence gate (`router.escalation.calibration` in topology.yaml),
written by `ruyiflow calibrate --risk EPS --delta D` and read by the router (which exits a
request may start at) and the nodes (the gate's thresholds).

Its guarantee: with probability >= 1 - delta over the calibration prompts, the tokens served
disagree with the deepest exit's greedy tokens on at most `eps` of positions on average, for a
request started at any exit. Per exit: the first-token measure the gate compares and its
threshold; a `threshold` of None means no threshold was certified there, so the gate never
lets that exit serve (the router does not start requests there; a pinned request moves on).
A node refuses a calibration made for weights with another fingerprint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ruyiflow.cluster.errors import TopologyError

# Higher is more confident for every measure but entropy (nats), where lower is.
MEASURES = ("max_prob", "margin", "entropy", "probe")


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise TopologyError(message, path)


def passes(measure: str, value: float, threshold: float | None) -> bool:
    """Whether `value` of `measure` clears `threshold` (None: never)."""
    if threshold is None or not math.isfinite(value):
        return False
    return value <= threshold if measure == "entropy" else value >= threshold


@dataclass(frozen=True)
class CalibratedExit:
    """One exit's gate: pass iff `measure` clears `threshold` (entropy: <=, others: >=).
    `probe` is the digest of the probe file the threshold was certified for (measure probe)."""

    exit: int
    measure: str = "max_prob"
    threshold: float | None = None
    probe: str | None = None

    def __post_init__(self) -> None:
        _check(self.exit >= 1, "exit", "must be a layer index >= 1")
        _check(self.measure in MEASURES, "measure", f"must be one of {', '.join(MEASURES)}")
        _check(
            self.threshold is None or math.isfinite(self.threshold), "threshold", "must be finite"
        )
        _check(
            (self.probe is not None) == (self.measure == "probe"),
            "probe",
            "a probe digest goes with measure probe, and only with it",
        )

    @property
    def is_certified(self) -> bool:
        return self.threshold is not None


@dataclass(frozen=True)
class Calibration:
    """What `ruyiflow calibrate --risk` certified, for the weights named by `fingerprint`."""

    eps: float
    delta: float
    n: int  # calibration prompts the test ran on
    date: str  # ISO date of the calibration (informative)
    fingerprint: str
    exits: tuple[CalibratedExit, ...] = ()
    probes: str | None = None  # directory of the probes; None: shipped beside the overlay

    def __post_init__(self) -> None:
        _check(0.0 < self.eps < 1.0, "eps", "must be in (0, 1)")
        _check(0.0 < self.delta < 1.0, "delta", "must be in (0, 1)")
        _check(self.n >= 1, "n", "must be >= 1")
        _check(bool(self.fingerprint), "fingerprint", "must not be empty")
        seen = [e.exit for e in self.exits]
        _check(seen == sorted(set(seen)), "exits", "exits must be strictly increasing")

    def entry(self, exit_layer: int) -> CalibratedExit | None:
        for entry in self.exits:
            if entry.exit == exit_layer:
                return entry
        return None

    def is_certified(self, exit_layer: int) -> bool:
        entry = self.entry(exit_layer)
        return entry is not None and entry.is_certified

    def next_exit(self, exit_layer: int, model_exits: tuple[int, ...]) -> int | None:
        """Where a request moves when the gate at `exit_layer` says no: the next deeper exit
        with a certified threshold, else the deepest exit (None when already there)."""
        deepest = max(model_exits)
        for e in sorted(model_exits):
            if exit_layer < e < deepest and self.is_certified(e):
                return e
        return deepest if exit_layer < deepest else None

    def start_exit(self, exit_layer: int, model_exits: tuple[int, ...]) -> int:
        """The exit a request routed to `exit_layer` starts at: itself when certified (or the
        deepest), else `next_exit` - starting where the gate never passes only costs compute."""
        if exit_layer >= max(model_exits) or self.is_certified(exit_layer):
            return exit_layer
        return self.next_exit(exit_layer, model_exits) or exit_layer
