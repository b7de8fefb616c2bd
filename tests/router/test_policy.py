"""Routing policy: thresholds, overrides, power-of-two node choice, escalation targets, and the
mapping of domain errors to gRPC status codes."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path

import grpc
import pytest

from ruyiflow.cluster.errors import (
    InvalidRequest,
    ModelMismatch,
    NodeUnavailable,
    Overloaded,
    TopologyError,
    status_code_for,
)
from ruyiflow.cluster.topology import Topology
from ruyiflow.router.policy import (
    NodeLoad,
    Overrides,
    choose_exit,
    escalation_exit,
    pick_node,
    plan_escalation,
    plan_route,
    threshold_exit,
)

SHIPPED = Topology.load(Path(__file__).resolve().parents[2] / "topology.yaml")
# The thresholds' own routing: the shipped topology without its risk calibration, whose starts
# test_shipped_calibration_starts_at_the_deepest_exit checks.
TOPOLOGY = dataclasses.replace(
    SHIPPED,
    router=dataclasses.replace(
        SHIPPED.router,
        escalation=dataclasses.replace(SHIPPED.router.escalation, calibration=None),
    ),
)
THRESHOLDS = TOPOLOGY.router.thresholds


@pytest.mark.parametrize(
    ("score", "exit_"),
    [(0.0, 12), (0.349, 12), (0.35, 16), (0.5, 20), (0.79, 24), (0.8, 29), (1.0, 29)],
)
def test_thresholds(score: float, exit_: int) -> None:
    assert threshold_exit(score, THRESHOLDS) == exit_
    tier = "edge" if exit_ <= 16 else "cloud"
    assert plan_route(TOPOLOGY, score).tier == tier
    assert plan_route(TOPOLOGY, score).exit == exit_


def test_shipped_calibration_starts_at_the_deepest_exit() -> None:
    # it certifies no shallow exit (eps 0.05 on SmolLM2's weak exits): every band starts at 29
    for score in (0.0, 0.35, 0.5, 0.79):
        plan = plan_route(SHIPPED, score)
        assert (plan.exit, plan.tier, plan.candidates) == (29, "cloud", ("cloud-0",))
        assert plan.scored_exit == threshold_exit(score, THRESHOLDS)
    assert plan_route(SHIPPED, 0.0, Overrides(exit=12)).exit == 12  # pinned: the node's gate


def test_score_out_of_range() -> None:
    with pytest.raises(ValueError):
        threshold_exit(1.5, THRESHOLDS)


def test_plan_candidates() -> None:
    plan = plan_route(TOPOLOGY, 0.1)
    assert (plan.model, plan.tier, plan.exit, plan.candidates) == (
        "smollm2",
        "edge",
        12,
        ("edge-0",),
    )


def test_overrides() -> None:
    assert plan_route(TOPOLOGY, 0.0, Overrides(exit=24)).exit == 24
    assert plan_route(TOPOLOGY, 0.0, Overrides(exit=24)).tier == "cloud"
    # a tier override keeps the scorer's intent as far as the tier allows
    assert (plan_route(TOPOLOGY, 0.99, Overrides(tier="edge")).exit) == 16
    assert (plan_route(TOPOLOGY, 0.0, Overrides(tier="cloud")).exit) == 20
    assert plan_route(TOPOLOGY, 0.55, Overrides(tier="cloud")).exit == 20
    plan = plan_route(TOPOLOGY, 0.0, Overrides(node="cloud-0"))
    assert (plan.tier, plan.exit, plan.candidates) == ("cloud", 20, ("cloud-0",))
    plan = plan_route(TOPOLOGY, 0.0, Overrides(node="cloud-0", exit=29, tier="cloud"))
    assert plan.exit == 29


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(exit=13), "unknown exit 13"),
        (dict(exit=12, tier="cloud"), "not served on tier 'cloud'"),
        (dict(node="edge-9"), "unknown node 'edge-9'"),
        (dict(node="edge-0", tier="cloud"), "is on tier 'edge'"),
        (dict(node="edge-0", exit=29), "does not serve exit 29"),
    ],
)
def test_invalid_overrides(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        plan_route(TOPOLOGY, 0.5, Overrides(**overrides))


def test_invalid_override_values() -> None:
    with pytest.raises(InvalidRequest, match="unknown tier 'fog'"):
        Overrides(tier="fog")
    with pytest.raises(InvalidRequest, match="unknown handoff mode"):
        Overrides(handoff_mode="teleport")
    with pytest.raises(InvalidRequest, match="no node on tier 'cloud'"):
        choose_exit(0.5, THRESHOLDS, Overrides(tier="cloud"), {12: ("edge",)})


def test_escalation_targets() -> None:
    assert escalation_exit([12, 16, 20, 24, 29], 12, 16) == 16
    assert escalation_exit([12, 16, 24, 29], 16, 20) == 24
    assert escalation_exit([12, 16, 20], 16, 29) == 20
    assert escalation_exit([12, 16], 16, 20) is None
    plan = plan_escalation(TOPOLOGY, "smollm2", 16, 20)
    assert plan is not None and (plan.tier, plan.exit, plan.candidates) == (
        "cloud",
        20,
        ("cloud-0",),
    )
    assert plan_escalation(TOPOLOGY, "smollm2", 29, 30) is None


def loads(*outstanding: int, unhealthy: tuple[int, ...] = ()) -> list[NodeLoad]:
    return [
        NodeLoad(f"n{i}", healthy=i not in unhealthy, outstanding_tokens=work)
        for i, work in enumerate(outstanding)
    ]


def test_p2c_prefers_least_loaded() -> None:
    rng = random.Random(7)
    pair = loads(500, 20)
    assert all(pick_node(pair, rng).name == "n1" for _ in range(50))
    many = loads(900, 10, 400, 600)
    picks = Counter(pick_node(many, rng).name for _ in range(2000))
    assert picks["n0"] == 0  # the busiest only wins if sampled twice, which p2c never does
    assert picks["n1"] == max(picks.values())
    assert picks["n1"] > 2000 * 0.45  # least loaded wins every pair it is in: 3/6 of pairs


def test_p2c_is_seeded() -> None:
    many = loads(5, 5, 5, 5, 5)
    first = [pick_node(many, random.Random(3)).name for _ in range(5)]
    again = [pick_node(many, random.Random(3)).name for _ in range(5)]
    assert first == again


def test_unhealthy_and_draining_never_chosen() -> None:
    rng = random.Random(1)
    nodes = loads(900, 0, 0, unhealthy=(1, 2))
    assert {pick_node(nodes, rng).name for _ in range(200)} == {"n0"}
    draining = [NodeLoad("a", draining=True), NodeLoad("b", outstanding_tokens=10**6)]
    assert {pick_node(draining, rng).name for _ in range(50)} == {"b"}
    with pytest.raises(NodeUnavailable):
        pick_node(loads(1, 2, unhealthy=(0, 1)), rng)
    with pytest.raises(NodeUnavailable):
        pick_node([], rng)


def test_overloaded() -> None:
    busy = [NodeLoad("a", queued=8), NodeLoad("b", queued=9)]
    with pytest.raises(Overloaded):
        pick_node(busy, random.Random(0), max_queued=8)
    busy.append(NodeLoad("c", queued=2, outstanding_tokens=10**9))
    assert pick_node(busy, random.Random(0), max_queued=8).name == "c"


def test_status_codes_in_one_place() -> None:
    assert status_code_for(InvalidRequest("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code_for(ModelMismatch("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_code_for(Overloaded("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code_for(NodeUnavailable("x")) == grpc.StatusCode.UNAVAILABLE
    assert status_code_for(RuntimeError("x")) == grpc.StatusCode.INTERNAL

    class EmptyPrompt(InvalidRequest):
        pass

    assert status_code_for(EmptyPrompt("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_code_for(TopologyError("x")) == grpc.StatusCode.INTERNAL
