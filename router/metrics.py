"""Prometheus metrics of the router, on a private registry, served over HTTP at `/metrics`.

Every name starts with `ruyiflow_router_`. Label values come from closed sets (tiers, modes,
reasons, outcomes, front ends) or from the topology (node names, exits), and anything else is
refused with ValueError, so cardinality stays bounded. The router calls the `observe_*` methods;
nothing here knows about gRPC or HTTP: `api` says which front end a request came through.
"""

from __future__ import annotations

import threading
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from ruyiflow.cluster.metrics_http import (
    BYTES_BUCKETS,
    INTER_TOKEN_BUCKETS,
    SECONDS_BUCKETS,
    MetricsServer,
    serve_registry,
)
from ruyiflow.cluster.tls import TlsFiles
from ruyiflow.cluster.topology import TIERS

PREFIX = "ruyiflow_router_"
OUTCOMES = ("ok", "invalid", "unavailable", "overloaded", "cancelled", "error")
APIS = ("grpc", "openai")  # the router's front ends: gRPC Generate, the OpenAI HTTP API
MODES = ("hidden", "tokens")  # a branch switch on one node is an escalation, not a handoff
REASONS = ("low_confidence", "forced", "node_failure", "drain", "gate")
SCORE_BUCKETS = tuple(round(0.05 * k, 2) for k in range(1, 21))
CLOUD_SHARE_WINDOW = 1000  # finished requests the realised cloud share is measured over


def _check(value: str, allowed: tuple[str, ...] | frozenset[str], label: str) -> str:
    if value not in allowed:
        raise ValueError(f"metric label {label}={value!r} is not one of {sorted(allowed)}")
    return value


class RouterMetrics:
    """The router's metrics. `node_names` and `exits` (from the topology) bound those labels."""

    def __init__(
        self,
        node_names: tuple[str, ...] = (),
        exits: tuple[int, ...] = (),
        cloud_share_window: int = CLOUD_SHARE_WINDOW,
    ) -> None:
        if cloud_share_window < 1:
            raise ValueError(f"cloud_share_window must be >= 1, got {cloud_share_window}")
        self.registry = CollectorRegistry(auto_describe=True)
        self.node_names = frozenset(node_names)
        self.exits = frozenset(str(e) for e in exits)
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "Finished requests by first tier/exit, outcome and front end.",
            ["tier", "exit", "outcome", "api"],
            registry=r,
        )
        self.rejected = Counter(
            PREFIX + "rejected_requests",
            "Requests refused before a tier/exit was chosen (bad input, draining), by front end.",
            ["outcome", "api"],
            registry=r,
        )
        self.difficulty = Histogram(
            PREFIX + "difficulty_score",
            "Scorer difficulty of requests.",
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.escalations = Counter(
            PREFIX + "escalations",
            "Moves to a deeper exit (same node or not).",
            ["from_tier", "to_tier", "reason"],
            registry=r,
        )
        self.handoffs = Counter(
            PREFIX + "handoffs",
            "Request moves by tier, mode and reason.",
            ["from_tier", "to_tier", "mode", "reason"],
            registry=r,
        )
        self.handoff_bytes = Histogram(
            PREFIX + "handoff_bytes",
            "Bytes moved per handoff.",
            ["mode"],
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.handoff_seconds = Histogram(
            PREFIX + "handoff_seconds",
            "Time to move a request's state.",
            ["mode"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time to the first token by first tier.",
            ["tier"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            PREFIX + "inter_token_seconds",
            "Time between tokens by serving tier.",
            ["tier"],
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "request_duration_seconds",
            "End-to-end request latency by first tier.",
            ["tier"],
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            PREFIX + "generated_tokens",
            "Tokens relayed to clients by exit that produced them.",
            ["exit"],
            registry=r,
        )
        self.in_flight = Gauge(PREFIX + "in_flight_requests", "Streams open.", registry=r)
        self.queued = Gauge(PREFIX + "queued_requests", "Requests not yet placed.", registry=r)
        self.node_up = Gauge(
            PREFIX + "node_up", "1 if the node's health check is SERVING.", ["node"], registry=r
        )
        self.retries = Counter(
            PREFIX + "retries", "Resumes after a node failure.", ["tier"], registry=r
        )
        # A sliding window, not a running total: drift away from the target shows within
        # `cloud_share_window` requests however long the router has been up.
        self.cloud_share = Gauge(
            PREFIX + "cloud_share",
            "Fraction of the last ok requests (cloud_share_window_requests) first served on cloud.",
            registry=r,
        )
        self.cloud_share_window = Gauge(
            PREFIX + "cloud_share_window_requests",
            "Requests the cloud_share gauge currently averages over (at most N).",
            registry=r,
        )
        self.cloud_share_target: Gauge | None = None  # registered once a target is set
        self._lock = threading.Lock()
        self._recent_is_cloud: deque[bool] = deque(maxlen=cloud_share_window)
        self._num_recent_cloud = 0
        for name in sorted(self.node_names):
            self.node_up.labels(node=name).set(0)

    def _exit(self, exit_: int) -> str:
        return _check(str(exit_), self.exits, "exit") if self.exits else str(int(exit_))

    def observe_request(
        self,
        tier: str,
        exit_: int,
        outcome: str,
        score: float | None = None,
        ttft_s: float | None = None,
        total_s: float | None = None,
        api: str = "grpc",
    ) -> None:
        """A finished request: first tier/exit served (or planned), outcome, and timings."""
        _check(tier, TIERS, "tier")
        self.requests.labels(
            tier=tier,
            exit=self._exit(exit_),
            outcome=_check(outcome, OUTCOMES, "outcome"),
            api=_check(api, APIS, "api"),
        ).inc()
        if score is not None:
            self.difficulty.observe(score)
        if ttft_s is not None:
            self.ttft.labels(tier=tier).observe(ttft_s)
        if total_s is not None:
            self.e2e.labels(tier=tier).observe(total_s)
        if outcome == "ok":
            with self._lock:
                recent = self._recent_is_cloud
                if len(recent) == recent.maxlen:
                    self._num_recent_cloud -= recent[0]  # the oldest leaves the window
                recent.append(tier == "cloud")
                self._num_recent_cloud += tier == "cloud"
                self.cloud_share.set(self._num_recent_cloud / len(recent))
                self.cloud_share_window.set(len(recent))

    def observe_rejected(self, outcome: str, score: float | None = None, api: str = "grpc") -> None:
        """A request refused before routing chose a tier and exit for it."""
        self.rejected.labels(
            outcome=_check(outcome, OUTCOMES, "outcome"), api=_check(api, APIS, "api")
        ).inc()
        if score is not None:
            self.difficulty.observe(score)

    def observe_tokens(self, exit_: int, tier: str, num_tokens: int, gap_s: float | None) -> None:
        """Tokens relayed in one chunk; `gap_s` is the time since the previous chunk."""
        self.tokens.labels(exit=self._exit(exit_)).inc(num_tokens)
        if gap_s is not None and num_tokens > 0:
            per_token = self.inter_token.labels(tier=_check(tier, TIERS, "tier"))
            for _ in range(num_tokens):
                per_token.observe(gap_s / num_tokens)

    def observe_escalation(self, from_tier: str, to_tier: str, reason: str) -> None:
        self.escalations.labels(
            from_tier=_check(from_tier, TIERS, "from_tier"),
            to_tier=_check(to_tier, TIERS, "to_tier"),
            reason=_check(reason, REASONS, "reason"),
        ).inc()

    def observe_handoff(
        self, from_tier: str, to_tier: str, mode: str, reason: str, num_bytes: int, seconds: float
    ) -> None:
        """A request's state moved to another node (an escalation or a failure resume)."""
        _check(mode, MODES, "mode")
        self.handoffs.labels(
            from_tier=_check(from_tier, TIERS, "from_tier"),
            to_tier=_check(to_tier, TIERS, "to_tier"),
            mode=mode,
            reason=_check(reason, REASONS, "reason"),
        ).inc()
        self.handoff_bytes.labels(mode=mode).observe(num_bytes)
        self.handoff_seconds.labels(mode=mode).observe(seconds)

    def observe_retry(self, tier: str) -> None:
        self.retries.labels(tier=_check(tier, TIERS, "tier")).inc()

    def set_node_up(self, node: str, is_up: bool) -> None:
        self.node_up.labels(node=_check(node, self.node_names, "node")).set(1 if is_up else 0)

    def set_cloud_share_target(self, share: float | None) -> None:
        """Export the configured target beside the realised share (None: leave it unset)."""
        if share is None:
            return
        if self.cloud_share_target is None:
            self.cloud_share_target = Gauge(
                PREFIX + "cloud_share_target",
                "Configured target cloud share (topology router.target_cloud_share).",
                registry=self.registry,
            )
        self.cloud_share_target.set(share)

    def set_load(self, in_flight: int, queued: int) -> None:
        self.in_flight.set(in_flight)
        self.queued.set(queued)

    def exposition(self) -> bytes:
        """The text exposition format, as `/metrics` serves it."""
        return generate_latest(self.registry)

    def serve(
        self, address: str, tls: TlsFiles | None = None, require_client_cert: bool = False
    ) -> MetricsServer:
        """Serve `/metrics` on `host:port` (port 0 picks a free one) in a daemon thread,
        over HTTPS with `tls`."""
        return serve_registry(address, self.registry, "router.metrics", tls, require_client_cert)
