"""A node's engine threads: the topology's `threads:`, or the cores shared among the engine
nodes that run on this machine (those listening on loopback)."""

from __future__ import annotations

import pytest

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.local_cluster import write_topology
from ruyiflow.node.threads import engine_threads, usable_cores

ENGINE_NODE = """
  - name: llama
    tier: cloud
    listen: 127.0.0.1:7003
    metrics: 127.0.0.1:7004
    model: smollm2
    exits: [29]
    backend: openai
    base_url: http://127.0.0.1:8000/v1
    served_model: smollm2
"""


def _default(tmp_path, edit=lambda text: text):
    path = tmp_path / "t.yaml"
    write_topology(path)
    text = edit(path.read_text())
    return parse_topology(text)


def test_loopback_engine_nodes_split_the_cores(tmp_path):
    topo = _default(tmp_path)
    edge, cloud = topo.node("edge-0"), topo.node("cloud-0")
    assert [engine_threads(topo, n, cores=8) for n in (edge, cloud)] == [4, 4]
    assert [engine_threads(topo, n, cores=3) for n in (edge, cloud)] == [1, 1]
    assert engine_threads(topo, edge, cores=1) == 1  # never 0
    assert 1 <= engine_threads(topo, edge) <= usable_cores()


def test_an_openai_node_takes_no_share(tmp_path):
    topo = _default(tmp_path, lambda t: t.replace("router:", ENGINE_NODE.lstrip("\n") + "router:"))
    assert engine_threads(topo, topo.node("edge-0"), cores=8) == 4


def test_explicit_threads_and_nodes_beyond_loopback(tmp_path):
    def edit(text: str) -> str:
        text = text.replace("    max_context: 2048\n", "    max_context: 2048\n    threads: 3\n", 1)
        return text.replace("listen: 127.0.0.1:", "listen: 10.0.0.7:", 2)  # edge-0 and cloud-0

    topo = _default(tmp_path, edit)
    assert engine_threads(topo, topo.node("edge-0"), cores=8) == 3
    assert engine_threads(topo, topo.node("cloud-0"), cores=8) == 4  # same host as edge-0
    apart = _default(tmp_path, lambda t: t.replace("listen: 127.0.0.1:", "listen: 10.0.0.7:", 1))
    assert engine_threads(apart, apart.node("edge-0"), cores=8) == 8  # alone on 10.0.0.7
    assert engine_threads(apart, apart.node("cloud-0"), cores=8) == 8  # alone on loopback
    wild = _default(tmp_path, lambda t: t.replace("listen: 127.0.0.1:", "listen: 0.0.0.0:", 2))
    assert engine_threads(wild, wild.node("edge-0"), cores=8) == 8


@pytest.mark.parametrize(
    "line, match",
    [("    threads: -1\n", "must be >= 0"), ("    threads: two\n", "an integer")],
)
def test_bad_threads_are_refused(tmp_path, line, match):
    with pytest.raises(TopologyError, match=match):
        _default(
            tmp_path,
            lambda t: t.replace("    max_context: 2048\n", f"    max_context: 2048\n{line}", 1),
        )


def test_an_openai_node_refuses_threads(tmp_path):
    node = ENGINE_NODE.lstrip("\n") + "    threads: 2\n"
    with pytest.raises(TopologyError, match="threads.*backend openai"):
        _default(tmp_path, lambda t: t.replace("router:", node + "router:"))
