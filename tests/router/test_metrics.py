"""Router metrics: names prefixed `ruyiflow_`, bounded labels, exposition parses, HTTP serving."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ruyiflow.router.metrics import RouterMetrics

NODES = ("edge-0", "cloud-0")
EXITS = (12, 16, 20, 24, 29)


def sample_metrics() -> RouterMetrics:
    metrics = RouterMetrics(NODES, EXITS)
    metrics.observe_request("edge", 12, "ok", score=0.1, ttft_s=0.02, total_s=0.3)
    metrics.observe_request("cloud", 29, "ok", score=0.9, ttft_s=0.05, total_s=1.2)
    metrics.observe_request("cloud", 24, "ok", score=0.7, ttft_s=0.04, total_s=0.8)
    metrics.observe_request("edge", 16, "invalid", score=0.4)
    metrics.observe_tokens(12, "edge", 4, gap_s=0.02)
    metrics.observe_tokens(29, "cloud", 1, gap_s=None)
    metrics.observe_escalation("edge", "cloud", "low_confidence")
    metrics.observe_handoff("edge", "cloud", "hidden", "low_confidence", 2_000_000, 0.012)
    metrics.observe_handoff("cloud", "cloud", "tokens", "node_failure", 400, 0.003)
    metrics.observe_retry("cloud")
    metrics.set_node_up("edge-0", True)
    metrics.set_load(in_flight=3, queued=1)
    return metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_exposition_parses_with_prefixed_names() -> None:
    text = sample_metrics().exposition().decode()
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 15
    assert all(f.name.startswith("ruyiflow_") for f in families)
    values = samples(text)
    ok_edge = (
        "ruyiflow_router_requests_total",
        (("api", "grpc"), ("exit", "12"), ("outcome", "ok"), ("tier", "edge")),
    )
    assert values[ok_edge] == 1.0
    assert values[("ruyiflow_router_generated_tokens_total", (("exit", "12"),))] == 4.0
    assert values[("ruyiflow_router_difficulty_score_count", ())] == 4.0
    handoff = (
        "ruyiflow_router_handoffs_total",
        (
            ("from_tier", "edge"),
            ("mode", "hidden"),
            ("reason", "low_confidence"),
            ("to_tier", "cloud"),
        ),
    )
    assert values[handoff] == 1.0
    assert values[("ruyiflow_router_handoff_bytes_sum", (("mode", "hidden"),))] == 2_000_000
    assert values[("ruyiflow_router_inter_token_seconds_count", (("tier", "edge"),))] == 4.0
    assert values[("ruyiflow_router_node_up", (("node", "edge-0"),))] == 1.0
    assert values[("ruyiflow_router_node_up", (("node", "cloud-0"),))] == 0.0
    assert values[("ruyiflow_router_cloud_share", ())] == pytest.approx(2 / 3)
    assert values[("ruyiflow_router_in_flight_requests", ())] == 3.0
    assert values[("ruyiflow_router_retries_total", (("tier", "cloud"),))] == 1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.observe_request("fog", 12, "ok"),
        lambda m: m.observe_request("edge", 13, "ok"),
        lambda m: m.observe_request("edge", 12, "meh"),
        lambda m: m.observe_request("edge", 12, "ok", api="rest"),
        lambda m: m.observe_rejected("invalid", api="soap"),
        lambda m: m.observe_handoff("edge", "cloud", "carrier-pigeon", "forced", 1, 0.1),
        lambda m: m.observe_escalation("edge", "cloud", "whim"),
        lambda m: m.set_node_up("edge-7", True),
    ],
)
def test_labels_are_bounded(call) -> None:
    with pytest.raises(ValueError):
        call(RouterMetrics(NODES, EXITS))


def test_serves_metrics_over_http() -> None:
    metrics = sample_metrics()
    server = metrics.serve("127.0.0.1:0")
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        server.stop()
    assert "ruyiflow_router_requests_total" in text
    assert all(f.name.startswith("ruyiflow_") for f in text_string_to_metric_families(text))


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_check_metrics() -> None:
    text = sample_metrics().exposition()
    result = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
