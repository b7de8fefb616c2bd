"""Node metrics on a private registry (names `ruyiflow_node_*`, labels bounded by the
topology: node, tier, exit, reason, outcome)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ruyiflow.cluster.metrics_http import BYTES_BUCKETS, INTER_TOKEN_BUCKETS
from ruyiflow.cluster.metrics_http import SECONDS_BUCKETS as LATENCY_BUCKETS


class NodeMetrics:
    def __init__(self, node: str, tier: str):
        self.registry = CollectorRegistry()
        r, base = self.registry, ["node", "tier"]
        self.labels = {"node": node, "tier": tier}
        self.requests = Counter(
            "ruyiflow_node_requests",
            "Requests finished, by exit and outcome",
            [*base, "exit", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "ruyiflow_node_tokens_generated",
            "Tokens generated, by exit",
            [*base, "exit"],
            registry=r,
        )
        self.escalations = Counter(
            "ruyiflow_node_escalations",
            "Escalations decided here: local branch switch or handoff out",
            [*base, "kind", "reason"],
            registry=r,
        )
        self.handoff_bytes = Histogram(
            "ruyiflow_node_handoff_bytes",
            "Handoff state sizes",
            [*base, "direction"],
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "ruyiflow_node_time_to_first_token_seconds",
            "Time to first token",
            base,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "ruyiflow_node_inter_token_seconds",
            "Time between tokens",
            base,
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "ruyiflow_node_request_seconds",
            "Request duration on this node",
            base,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("ruyiflow_node_in_flight", "Streams being served", base, registry=r)
        self.running = Gauge("ruyiflow_node_running", "Sequences decoding", base, registry=r)
        self.queued = Gauge(
            "ruyiflow_node_queued", "Sequences waiting for prefill", base, registry=r
        )
        self.ready = Gauge(
            "ruyiflow_node_ready", "1 when the model is loaded and serving", base, registry=r
        )

    def watch_load(self, load: Callable[[], tuple[int, int, int]]) -> None:
        """Read `running` and `queued` from `load()` (the engine thread's queues) at each scrape."""
        self.running.labels(**self.lab()).set_function(lambda: load()[0])
        self.queued.labels(**self.lab()).set_function(lambda: load()[1])

    def lab(self, **extra: str) -> dict[str, str]:
        return {**self.labels, **extra}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
