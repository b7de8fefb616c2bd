"""`backend: openai` in topology.yaml: the shipped deploy/topology-engine.yaml loads and its
engine command expands; the fields are checked with clear messages."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.topology_yaml import load_topology, parse_topology
from ruyiflow.engine.checkpoint import embedded_gguf_path
from ruyiflow.engine_process import engine_processes

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

BASE = """
models:
  m: {{path: smollm2}}
nodes:
  - name: n
    tier: {tier}
    listen: 127.0.0.1:7701
    metrics: 127.0.0.1:9701
    model: m
    exits: {exits}
{extra}
router:
  listen: 127.0.0.1:7700
  metrics: 127.0.0.1:9700
  http: ''
  thresholds: [{{exit: 29}}]
"""
ENGINE = """    backend: openai
    base_url: http://127.0.0.1:8080/v1
    served_model: smollm2"""


def parse(tier: str = "cloud", exits: str = "[29]", extra: str = ENGINE):
    return parse_topology(BASE.format(tier=tier, exits=exits, extra=extra), "t.yaml")


def test_the_shipped_engine_topology_loads_and_its_command_expands():
    topology = load_topology(DEPLOY / "topology-engine.yaml")
    node = topology.node("cloud-llama")
    assert (node.backend, node.served_model, node.exits) == ("openai", "smollm2", (29,))
    (engine,) = engine_processes(topology)
    assert engine.argv[0] == sys.executable
    assert str(embedded_gguf_path()) in engine.argv
    assert engine.base_url == node.base_url


def test_a_valid_engine_node():
    node = parse(extra=ENGINE + "\n    api_key_env: ENGINE_KEY\n    max_concurrency: 4").node("n")
    assert (node.api_key_env, node.engine_concurrency) == ("ENGINE_KEY", 4)
    assert parse(extra=ENGINE).node("n").engine_concurrency == 8  # max_batch by default


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tier": "edge"}, "nodes[0].backend: backend openai runs on cloud nodes"),
        ({"exits": "[24, 29]"}, "nodes[0].exits: an engine serves one exit"),
        ({"extra": ENGINE.replace("http://127.0.0.1:8080/v1", "10.0.0.5:8000")}, "base_url"),
        ({"extra": ENGINE.replace("    served_model: smollm2", "")}, "served_model: required"),
        ({"extra": ENGINE + "\n    api_key_env: 'not a name'"}, "must name an environment"),
        ({"extra": "    base_url: http://x:1/v1"}, "only valid with backend openai"),
        ({"extra": ENGINE + "\n    timeout_s: 0"}, "timeout_s: must be > 0"),
    ],
)
def test_engine_fields_are_checked(kwargs, message):
    with pytest.raises(TopologyError, match="t.yaml:") as err:
        parse(**kwargs)
    assert message in str(err.value)
