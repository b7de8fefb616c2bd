"""Thresholds naming another model: the hardest scores go to an MoE node beside the Ruyi family,
token-id prompts and tier overrides stay where they can be served, escalation past the family's
deepest served exit crosses to that model, and the topology refuses inconsistent entries."""

from __future__ import annotations

from pathlib import Path

import pytest

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.topology import Topology
from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.router.policy import Overrides, plan_escalation, plan_escalation_across, plan_route

ROOT = Path(__file__).resolve().parents[2]
MOE = Topology.load(ROOT / "deploy" / "topology-moe.yaml")

TEXT = """
models:
  ruyi: {path: /models/ruyi}
  moe: {path: /models/moe}
nodes:
  - {name: edge-0, tier: edge, listen: 'h:1', metrics: 'h:2', model: ruyi, exits: [11, 15]}
  - {name: cloud-moe, tier: cloud, listen: 'h:3', metrics: 'h:4', model: moe, exits: [31]}
router:
  listen: 'h:5'
  metrics: 'h:6'
  model: ruyi
  thresholds:
THRESHOLDS
"""


def topology(thresholds: str) -> Topology:
    return parse_topology(TEXT.replace("THRESHOLDS", thresholds))


def test_shipped_moe_example_sends_the_hardest_scores_to_the_moe_node() -> None:
    easy, deep, hardest = plan_route(MOE, 0.1), plan_route(MOE, 0.85), plan_route(MOE, 0.95)
    assert (easy.model, easy.tier, easy.exit) == ("ruyi-7b", "edge", 11)
    assert (deep.model, deep.exit, deep.candidates) == ("ruyi-7b", 27, ("cloud-ruyi",))
    assert (hardest.model, hardest.tier, hardest.exit) == ("hunyuan-a13b", "cloud", 31)
    assert hardest.candidates == ("cloud-moe",)


def test_token_id_prompts_and_tier_overrides_stay_on_the_routed_model() -> None:
    ids = plan_route(MOE, 0.95, across_models=False)
    assert (ids.model, ids.exit) == ("ruyi-7b", 27)
    edge = plan_route(MOE, 0.95, Overrides(tier="edge"))
    assert (edge.model, edge.tier, edge.exit) == ("ruyi-7b", "edge", 15)
    exit_ = plan_route(MOE, 0.95, Overrides(exit=19))
    assert (exit_.model, exit_.exit) == ("ruyi-7b", 19)
    node = plan_route(MOE, 0.1, Overrides(node="cloud-moe"))
    assert (node.model, node.exit) == ("hunyuan-a13b", 31)


def test_escalation_crosses_models_only_past_the_deepest_served_exit() -> None:
    t = topology("    - {below: 0.5, exit: 11}\n    - {model: moe, exit: 31}")
    assert plan_escalation(t, "ruyi", 11, 15).exit == 15  # a deeper exit of the same model first
    assert plan_escalation(t, "ruyi", 15, 19) is None
    across = plan_escalation_across(t, "ruyi")
    assert (across.model, across.exit, across.candidates) == ("moe", 31, ("cloud-moe",))
    assert plan_escalation_across(t, "moe") is None  # the hardest model has nowhere further
    assert plan_escalation_across(MOE, "ruyi-7b").model == "hunyuan-a13b"


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ("    - {below: 0.5, exit: 11}\n    - {model: nope, exit: 31}", "unknown model 'nope'"),
        ("    - {below: 0.5, exit: 11}\n    - {model: moe, exit: 30}", "exit 30 of model 'moe'"),
        ("    - {below: 0.5, exit: 11}\n    - {exit: 31}", "exit 31 of model 'ruyi'"),
        ("    - {below: 0.5, exit: 15}\n    - {exit: 11}", "shallower exits of the same model"),
        ("    - {below: 0.5, exit: 11}\n    - {model: '', exit: 31}", "must not be empty"),
    ],
)
def test_bad_threshold_models_are_refused(thresholds: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        topology(thresholds)


def test_other_model_may_take_a_middle_band() -> None:
    t = topology(
        "    - {below: 0.3, exit: 11}\n    - {below: 0.6, model: moe, exit: 31}\n    - {exit: 15}"
    )
    assert [plan_route(t, s).model for s in (0.1, 0.4, 0.9)] == ["ruyi", "moe", "ruyi"]


def test_a_node_of_another_model_gets_the_relayed_text_and_what_is_left() -> None:
    from ruyiflow.cluster.errors import InvalidRequest
    from ruyiflow.proto import ruyiflow_pb2 as pb
    from ruyiflow.router.requests import node_request, validate_request

    request = pb.GenerateRequest(text="hello")
    request.sampling.max_tokens = 10
    same = node_request(request, "r", MOE, 27, [5, 6, 7])
    assert list(same.prefix_token_ids) == [5, 6, 7] and not same.prefix_text
    assert same.sampling.max_tokens == 10  # a same-model prefix counts towards max_tokens
    other = node_request(request, "r", MOE, 31, [5, 6, 7], prefix_text="The cap")
    assert not other.prefix_token_ids and other.prefix_text == "The cap"
    assert other.sampling.max_tokens == 7
    default = node_request(pb.GenerateRequest(text="x"), "r", MOE, 31, [1, 2], prefix_text="ab")
    assert default.sampling.max_tokens == 128 - 2  # the node's default max_tokens, less 2
    request.prefix_text = "smuggled"
    with pytest.raises(InvalidRequest, match="prefix_text is for routers"):
        validate_request(request)
