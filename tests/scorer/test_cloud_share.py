"""The realised cloud share gauge: a sliding window over the last N ok requests, the configured
target beside it, and a live router with the learned scorer moving it."""

from __future__ import annotations

import dataclasses
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ruyiflow.router.learned_scorer import LearnedScorer
from ruyiflow.router.metrics import RouterMetrics
from tests.router.cluster import Cluster
from tests.scorer.synthetic import make_prompt


def gauges(metrics: RouterMetrics) -> dict[str, float]:
    text = metrics.exposition().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


def test_share_is_over_a_sliding_window() -> None:
    metrics = RouterMetrics(("edge-0", "cloud-0"), (12, 29), cloud_share_window=4)
    for tier in ("cloud", "cloud", "edge", "edge"):
        metrics.observe_request(tier, 12 if tier == "edge" else 29, "ok")
    assert gauges(metrics)["ruyiflow_router_cloud_share"] == 0.5
    metrics.observe_request("cloud", 29, "error")  # only ok requests count
    metrics.observe_request("edge", 12, "ok")
    metrics.observe_request("edge", 12, "ok")  # both clouds have left the window
    values = gauges(metrics)
    assert values["ruyiflow_router_cloud_share"] == 0.0
    assert values["ruyiflow_router_cloud_share_window_requests"] == 4
    assert "ruyiflow_router_cloud_share_target" not in values  # no target configured
    metrics.set_cloud_share_target(0.3)
    assert gauges(metrics)["ruyiflow_router_cloud_share_target"] == 0.3
    with pytest.raises(ValueError, match="window"):
        RouterMetrics(cloud_share_window=0)


def test_live_router_with_learned_scorer_moves_the_share(trained) -> None:
    cluster = Cluster()
    try:
        cluster.servicer.scorer = LearnedScorer(trained[2])
        rng = random.Random(3)
        share = "ruyiflow_router_cloud_share"
        for _ in range(3):  # easy prompts: the learned scorer keeps them on exit 12 (edge)
            reply = cluster.client.complete(make_prompt(12, rng), max_tokens=2)
            assert {s.exit for s in reply.sources} == {12} and reply.trace.difficulty < 0.35
        assert gauges(cluster.daemon.metrics)[share] == 0.0
        for _ in range(3):  # hard ones go to exit 29 on cloud-0
            reply = cluster.client.complete(make_prompt(29, rng), max_tokens=2)
            assert {s.exit for s in reply.sources} == {29} and reply.trace.difficulty >= 0.8
        assert gauges(cluster.daemon.metrics)[share] == pytest.approx(0.5)
    finally:
        cluster.close()


def test_router_exports_the_configured_target(trained) -> None:
    from ruyiflow.router.service import RouterServicer

    cluster = Cluster()
    try:
        router = cluster.topology.router
        if not hasattr(router, "target_cloud_share"):  # field not in the topology yet
            router = dataclasses.replace(router)
            object.__setattr__(router, "target_cloud_share", 0.25)
        else:
            router = dataclasses.replace(router, target_cloud_share=0.25)
        topology = dataclasses.replace(cluster.topology, router=router)
        metrics = RouterMetrics()
        RouterServicer(topology, cluster.registry, cluster.servicer.scorer, metrics)
        assert gauges(metrics)["ruyiflow_router_cloud_share_target"] == 0.25
    finally:
        cluster.close()
