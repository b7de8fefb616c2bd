"""The router's part of the topology: scorer, score -> exit thresholds, escalation (and the
confidence gate's calibration), handoff policy, replicas; frozen and validated like every spec
(`cluster.topology` holds the rest and the cross-checks)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ruyiflow.cluster.calibration import Calibration
from ruyiflow.cluster.escalation import EscalationSettings
from ruyiflow.cluster.spec_checks import ENV_NAME_RE, check, check_addresses, check_one_of

SCORERS = ("heuristic", "learned")
HANDOFF_MODES = ("auto", "hidden", "tokens")
DEFAULT_HTTP = "127.0.0.1:8000"  # the router's OpenAI-compatible HTTP API


@dataclass(frozen=True)
class ScorerSpec:
    """Which difficulty scorer the router runs (`router.scorers.make_scorer`)."""

    name: str = "heuristic"
    path: str | None = None  # weights of a learned scorer

    def __post_init__(self) -> None:
        check_one_of(self.name, SCORERS, "name")


@dataclass(frozen=True)
class Threshold:
    """Scores `< below` (and >= the previous entry's `below`) go to `exit` of `model` (default:
    the router's model); omit `below` on the last entry to catch the rest. Naming another model
    (e.g. an MoE) sends that band of scores there; requests reach it in `tokens` mode only."""

    exit: int
    below: float = math.inf
    model: str | None = None

    def __post_init__(self) -> None:
        check(self.exit >= 1, "exit", "must be a layer index >= 1")
        check(self.model is None or bool(self.model), "model", "must not be empty")
        check(0.0 < self.below <= 1.0 or self.below == math.inf, "below", "must be in (0, 1]")


@dataclass(frozen=True)
class EscalationSpec:
    """Escalate when max_prob stays under `threshold` for `window` consecutive tokens; with a
    `calibration` (`ruyiflow calibrate --risk`), the confidence gate checks each request's first
    token before anything streams (`cluster.calibration`)."""

    enabled: bool = True
    window: int = EscalationSettings.window
    threshold: float = EscalationSettings.threshold
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        check(self.window >= 1, "window", "must be >= 1")
        check(0.0 < self.threshold < 1.0, "threshold", "must be in (0, 1)")


@dataclass(frozen=True)
class HandoffPolicy:
    """How state moves: `auto` runs the cost model per request."""

    mode: str = "auto"
    max_retries: int = 2  # resumes after node failures, per request
    push: bool = True  # node-to-node push (False: relay through the router)

    def __post_init__(self) -> None:
        check_one_of(self.mode, HANDOFF_MODES, "mode")
        check(0 <= self.max_retries <= 16, "max_retries", "must be in 0..16")


@dataclass(frozen=True)
class RouterReplica:
    """Another router of the same topology (`router.replicas`): its own gRPC, metrics and
    OpenAI API addresses (empty `http`: not served); everything else is the router's."""

    listen: str
    metrics: str
    http: str = ""

    def __post_init__(self) -> None:
        check_addresses(self, ("listen", "metrics", "http")[: 3 if self.http else 2])


@dataclass(frozen=True)
class RouterSpec:
    """The router: addresses, scorer, score → exit thresholds, escalation and handoff policy.
    `model` is the routed model (default: the topology's only model); `http` is where the
    OpenAI-compatible API listens (empty: not served)."""

    listen: str
    metrics: str
    thresholds: tuple[Threshold, ...]
    model: str | None = None
    http: str = DEFAULT_HTTP
    scorer: ScorerSpec = ScorerSpec()
    escalation: EscalationSpec = EscalationSpec()
    handoff: HandoffPolicy = HandoffPolicy()
    grace_period_s: float = 10.0
    target_cloud_share: float | None = None  # what `ruyiflow calibrate` aimed at (exported)
    # Client API keys: the variable holding them (comma-separated); None: no key is asked for.
    api_keys_env: str | None = None
    # A node stream that sends nothing for this long is cancelled and resumed elsewhere.
    stream_idle_timeout_s: float = 20.0
    # Consecutive failed health checks (0.5 s apart) before a node counts as down.
    health_failures: int = 3
    # More routers `ruyiflow up` runs (clients list every `listens`; a stream whose router
    # dies resumes on another).
    replicas: tuple[RouterReplica, ...] = ()

    @property
    def listens(self) -> tuple[str, ...]:
        """The gRPC address of every router: this one, then the replicas."""
        return (self.listen, *(r.listen for r in self.replicas))

    def __post_init__(self) -> None:
        check_addresses(self, ("listen", "metrics", "http")[: 3 if self.http else 2])
        check(len(self.thresholds) > 0, "thresholds", "must list at least one exit")
        for i, threshold in enumerate(self.thresholds):
            path = f"thresholds[{i}]"
            is_last = i == len(self.thresholds) - 1
            check(
                is_last or threshold.below != math.inf,
                f"{path}.below",
                "only the last threshold may omit `below`",
            )
            check(
                not is_last or threshold.below == math.inf,
                f"{path}.below",
                "the last threshold must omit `below` (it catches the hardest scores)",
            )
            if i > 0:
                previous = self.thresholds[i - 1]
                check(threshold.below > previous.below, f"{path}.below", "must increase")
                check(
                    threshold.model != previous.model or threshold.exit >= previous.exit,
                    f"{path}.exit",
                    "harder scores must not map to shallower exits of the same model",
                )
        check(self.grace_period_s >= 0, "grace_period_s", "must be >= 0")
        check(
            self.stream_idle_timeout_s > 0 and math.isfinite(self.stream_idle_timeout_s),
            "stream_idle_timeout_s",
            "must be > 0",
        )
        check(self.health_failures >= 1, "health_failures", "must be >= 1")
        check(
            self.api_keys_env is None or bool(ENV_NAME_RE.fullmatch(self.api_keys_env)),
            "api_keys_env",
            "must name an environment variable",
        )
        check(
            self.target_cloud_share is None or 0.0 <= self.target_cloud_share <= 1.0,
            "target_cloud_share",
            "must be in [0, 1]",
        )
