"""When a request should move to a deeper exit: per-token confidence under a threshold for a
window of consecutive tokens, or a forced escalation after N tokens (tests, benchmarks).
Pure Python, tested without a model; the settings and their defaults are
`ruyiflow.cluster.escalation`'s (the topology and the router use them too)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ruyiflow.cluster.escalation import EscalationSettings  # noqa: F401 (re-exported)

LOW_CONFIDENCE = "low_confidence"
FORCED = "forced"


@dataclass
class EscalationWatch:
    """Tracks one request; `observe` returns a reason once it should escalate."""

    settings: EscalationSettings
    low_run: int = 0
    generated: int = 0
    forced_done: bool = field(default=False)

    def observe(self, max_prob: float) -> str | None:
        self.generated += 1
        s = self.settings
        if s.force_after_tokens and not self.forced_done and self.generated >= s.force_after_tokens:
            self.forced_done = True
            return FORCED
        if not s.enabled:
            return None
        self.low_run = self.low_run + 1 if max_prob < s.threshold else 0
        if self.low_run >= s.window:
            self.low_run = 0
            return LOW_CONFIDENCE
        return None

    def target_exit(self, current: int, model_exits: tuple[int, ...]) -> int | None:
        """Forced target, else the next deeper exit of the model (None at the last exit)."""
        if self.settings.force_to_exit is not None and self.settings.force_to_exit > current:
            return self.settings.force_to_exit
        deeper = [e for e in model_exits if e > current]
        return deeper[0] if deeper else None
