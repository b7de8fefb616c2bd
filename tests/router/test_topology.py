"""topology.yaml loading: the shipped file, helpers, and errors that name field and position."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.router_spec import Threshold
from ruyiflow.cluster.topology import LinkSpec, NodeSpec, Topology
from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.cluster.units import parse_address, parse_bandwidth

SHIPPED = Path(__file__).resolve().parents[2] / "topology.yaml"
BASE = SHIPPED.read_text()


def test_shipped_topology_runs_on_loopback() -> None:
    topo = Topology.load(SHIPPED)
    assert topo.router.listen == "127.0.0.1:7700" and topo.router.metrics == "127.0.0.1:9700"
    edge, cloud = topo.node("edge-0"), topo.node("cloud-0")
    assert (edge.tier, edge.listen, edge.metrics, edge.exits) == (
        "edge",
        "127.0.0.1:7701",
        "127.0.0.1:9701",
        (12, 16),
    )
    assert (cloud.tier, cloud.listen, cloud.metrics, cloud.exits) == (
        "cloud",
        "127.0.0.1:7702",
        "127.0.0.1:9702",
        (20, 24, 29),
    )
    model = topo.model("smollm2")
    assert (model.path, model.dtype, model.extra_exits) == ("smollm2", "float32", (12, 16, 20, 24))
    assert model.known_exits == (12, 16, 20, 24, 29)
    assert topo.routed_model == "smollm2"
    assert [t.exit for t in topo.router.thresholds] == [12, 16, 20, 24, 29]
    assert topo.router.thresholds[-1].below == math.inf
    assert topo.router.scorer.name == "heuristic"
    assert topo.router.handoff.mode == "auto"


def test_lookup_helpers() -> None:
    topo = Topology.load(SHIPPED)
    assert [n.name for n in topo.nodes_serving("smollm2", 16)] == ["edge-0"]
    assert [n.name for n in topo.nodes_serving("smollm2", 24, tier="cloud")] == ["cloud-0"]
    assert topo.nodes_serving("smollm2", 24, tier="edge") == ()
    assert topo.exit_tiers("smollm2") == {
        12: ("edge",),
        16: ("edge",),
        20: ("cloud",),
        24: ("cloud",),
        29: ("cloud",),
    }
    link = topo.link("cloud-0", "edge-0")
    assert link is topo.link("edge-0", "cloud-0") and link is not None
    assert link.bandwidth == pytest.approx(10e9 / 8)
    assert topo.link("edge-0", "edge-0") is None
    with pytest.raises(KeyError):
        topo.node("edge-9")


def test_with_ports_moves_every_endpoint() -> None:
    topo = Topology.load(SHIPPED)
    ports = {key: 40000 + i for i, key in enumerate(topo.endpoints())}
    moved = topo.with_ports(ports, host="localhost")
    assert moved.endpoints() == {key: f"localhost:{port}" for key, port in ports.items()}
    assert moved.node("edge-0").exits == (12, 16) and moved.router == dataclasses.replace(
        topo.router, listen="localhost:40000", metrics="localhost:40001", http="localhost:40002"
    )
    assert topo.with_ports({"edge-0.listen": 1234}).node("edge-0").listen == "127.0.0.1:1234"
    with pytest.raises(KeyError):
        topo.with_ports({"edge-7.listen": 1})
    with pytest.raises(TopologyError, match="already used"):
        topo.with_ports({"edge-0.listen": 7702})


# (text in the shipped file, replacement, field path, text whose position is reported)
ERRORS = [
    ("tier: edge", "tier: fog", "nodes[0].tier", "fog"),
    ("max_batch: 8", "max_batch: eight", "nodes[0].max_batch", "eight"),
    ("max_batch: 8", "max_batch: true", "nodes[0].max_batch", "true"),
    ("max_context: 8192", "max_context: 8192\n    colour: red", "nodes[1].colour", "colour"),
    (
        "model: smollm2\n    exits: [12",
        "model: smollm3\n    exits: [12",
        "nodes[0].model",
        "smollm3",
    ),
    ("exits: [12, 16]", "exits: [12, 17]", "nodes[0].exits[1]", "17]"),
    ("exits: [12, 16]", "exits: [16, 12]", "nodes[0].exits[1]", "12]"),
    ("exits: [12, 16]", "exits: 12", "nodes[0].exits", "12\n"),
    ("between: [edge-0, cloud-0]", "between: [edge-0, cloud-9]", "links[0].between[1]", "cloud-9"),
    ("listen: 127.0.0.1:7702", "listen: 127.0.0.1:77020", "nodes[1].listen", "127.0.0.1:77020"),
    ("listen: 127.0.0.1:7702", "listen: cloud.local", "nodes[1].listen", "cloud.local"),
    ("listen: 127.0.0.1:7702", "listen: 300.0.0.1:7702", "nodes[1].listen", "300.0.0.1"),
    (
        "listen: 127.0.0.1:7702",
        "listen: 127.0.0.1:7701",
        "nodes[1].listen",
        "127.0.0.1:7701\n    metrics: 127.0.0.1:9702",
    ),
    ("name: cloud-0", "name: edge-0", "nodes[1].name", "edge-0\n    tier: cloud"),
    ("bandwidth: 10Gbit", "bandwidth: 10Gfoo", "links[0].bandwidth", "10Gfoo"),
    ("rtt_ms: 0.05", "rtt_ms: -1", "links[0].rtt_ms", "-1\n"),
    ("    metrics: 127.0.0.1:9701\n", "", "nodes[0].metrics", "name: edge-0"),
    (
        "{below: 0.50, exit: 16}",
        "{below: 0.30, exit: 16}",
        "router.thresholds[1].below",
        "0.30",
    ),
    (
        "{below: 0.65, exit: 20}",
        "{below: 0.65, exit: 11}",
        "router.thresholds[2].exit",
        "11}",
    ),
    ("- {exit: 29}", "- {exit: 30}", "router.thresholds[4].exit", "30}"),
    ("mode: auto", "mode: fast", "router.handoff.mode", "fast"),
    ("name: heuristic", "name: oracle", "router.scorer.name", "oracle"),
    ("window: 4", "window: 0", "router.escalation.window", "0 "),
    ("dtype: float32", "dtype: int8", "models.smollm2.dtype", "int8"),
    (
        "extra_exits: [12, 16, 20, 24]",
        "extra_exits: [12, 16, 20, 29]",
        "models.smollm2.extra_exits[3]",
        "29]",
    ),
    (
        "  smollm2:\n    path",
        "  smollm2:\n    path: x\n  smollm2:\n    path",
        "models.smollm2",
        "smollm2:\n    path: smollm2",
    ),
    ("  model: smollm2\n  scorer", "  model: moe\n  scorer", "router.model", "moe"),
    ("links:", "linkz:", "linkz", "linkz"),
    (
        "backend: torch\n    max_batch: 8",
        "backend: torch\n    providers: [CPUExecutionProvider]\n    max_batch: 8",
        "nodes[0].providers",
        "[CPU",
    ),
]


@pytest.mark.parametrize(("old", "new", "path", "at"), ERRORS, ids=[e[2] for e in ERRORS])
def test_error_names_field_and_position(old: str, new: str, path: str, at: str) -> None:
    assert old in BASE
    text = BASE.replace(old, new, 1)
    offset = text.index(at)
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    with pytest.raises(TopologyError) as info:
        parse_topology(text, source="topology.yaml")
    message = str(info.value)
    assert message.startswith(f"topology.yaml:{line}:{column}: {path}: "), message
    assert info.value.path == path


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read"):
        Topology.load(tmp_path / "missing.yaml")
    with pytest.raises(TopologyError, match="empty"):
        parse_topology("")
    with pytest.raises(TopologyError, match=r"<string>:1:\d+: invalid YAML"):
        parse_topology("models: [")
    with pytest.raises(TopologyError, match="missing required section 'nodes'"):
        parse_topology("models: {}\nrouter: {}\n")


def test_specs_validate_when_built_in_code() -> None:
    node = NodeSpec("e", "edge", "127.0.0.1:1", "127.0.0.1:2", "m", (1,))
    with pytest.raises(TopologyError, match="tier"):
        dataclasses.replace(node, tier="fog")
    with pytest.raises(TopologyError, match="reserved"):
        dataclasses.replace(node, name="router")
    with pytest.raises(TopologyError, match="below"):
        Threshold(exit=3, below=1.5)
    with pytest.raises(TopologyError, match="two different nodes"):
        LinkSpec(("a", "a"), 1e9)


def test_units() -> None:
    assert parse_address("127.0.0.1:7700") == ("127.0.0.1", 7700)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address("localhost:0", allow_zero=True) == ("localhost", 0)
    for bad in ("localhost:0", "127.0.0.1", ":80", "[zz]:1", "a b:1"):
        with pytest.raises(TopologyError):
            parse_address(bad)
    assert parse_bandwidth("1Gbit") == 125e6
    assert parse_bandwidth("100 Mbps") == 12.5e6
    assert parse_bandwidth("125MB/s") == 125e6
    assert parse_bandwidth("1GiB/s") == 2**30
    assert parse_bandwidth(5000) == 5000.0
    for bad in ("fast", "0Gbit", "1 parsec"):
        with pytest.raises(TopologyError):
            parse_bandwidth(bad)
