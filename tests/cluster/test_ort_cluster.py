"""An edge node on ONNX Runtime beside a torch cloud node, as real processes: `Cluster.start`
exports the edge exit on first use (and reuses it after), the edge daemon runs with torch made
unimportable, and a request that starts there and escalates with a `hidden` handoff continues on
the torch node exactly as the destination branch would (greedy)."""

from __future__ import annotations

import sys

import pytest

from ruyiflow.cmd_up import Cluster
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.local_cluster import free_ports
from ruyiflow.onnx_exports import prepare_exports
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.client import RouterClient

PROMPT = "What is the capital of France?"
TOPOLOGY = """
models:
  smollm2: {{path: smollm2, extra_exits: [12, 16, 20, 24]}}
nodes:
  - {{name: edge-0, tier: edge, listen: '127.0.0.1:{p[0]}', metrics: '127.0.0.1:{p[1]}',
      model: smollm2, exits: [12], backend: onnxruntime, max_context: 1024}}
  - {{name: cloud-0, tier: cloud, listen: '127.0.0.1:{p[2]}', metrics: '127.0.0.1:{p[3]}',
      model: smollm2, exits: [29], max_context: 1024}}
router:
  listen: '127.0.0.1:{p[4]}'
  metrics: '127.0.0.1:{p[5]}'
  http: ''  # no OpenAI API: its default port may be taken
  thresholds:
    - {{below: 0.5, exit: 12}}
    - {{exit: 29}}
  escalation: {{enabled: false}}
  handoff: {{mode: hidden}}
  grace_period_s: 2
"""
NO_TORCH = "import sys; sys.modules['torch'] = None; from ruyiflow.cli import main; main()"


@pytest.fixture(scope="module")
def ort_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort-cluster")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(root / "cache"))  # exports land here (children inherit it)
    ports = free_ports(6)
    topo = root / "topology.yaml"
    topo.write_text(TOPOLOGY.format(p=ports))
    cluster = Cluster(str(topo), log_dir=root / "logs")
    for i, (name, argv, addr) in enumerate(cluster.specs):
        if name == "edge-0":  # the same command line, with torch unimportable
            cluster.specs[i] = (name, [sys.executable, "-c", NO_TORCH, *argv[3:]], addr)
    cluster.start(quiet=True)
    try:
        cluster.wait_healthy(timeout=300, progress=False)
        with RouterClient(f"127.0.0.1:{ports[4]}") as client:
            yield client, str(topo)
    finally:
        cluster.stop(grace=5)
        mp.undo()


def test_exports_are_made_once_and_reused(ort_cluster):
    _, topo = ort_cluster
    assert prepare_exports(topo, quiet=True) == []  # made by Cluster.start, still current


def test_ort_edge_hands_hidden_state_to_torch_cloud(ort_cluster, smollm2):
    client, _ = ort_cluster
    chunks = list(client.generate(PROMPT, max_tokens=12, escalation={"force_after_tokens": 4}))
    trace = chunks[-1].trace
    assert [s.node for s in trace.spans] == ["edge-0", "cloud-0"]
    (move,) = trace.handoffs
    assert move.mode == pb.HANDOFF_MODE_HIDDEN and move.to_exit == 29
    tokens = [t for c in chunks for t in c.token_ids]
    tok = smollm2.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    engine = Engine(smollm2)
    edge = [e.token_id for e in engine.generate(prompt, SamplingParams(max_tokens=4), 12)]
    cloud = [e.token_id for e in engine.generate(prompt + edge, SamplingParams(max_tokens=8), 29)]
    assert tokens == edge + cloud


def test_a_stale_export_is_made_again(ort_cluster, smollm2):
    import json

    from ruyiflow.cluster.topology import onnx_dir_for
    from ruyiflow.cluster.topology_yaml import load_topology
    from ruyiflow.onnx_exports import export_fingerprint

    _, topo_path = ort_cluster
    topo = load_topology(topo_path)
    path = onnx_dir_for(topo, topo.node("edge-0")) / "exit-12"
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["fingerprint"] = "made-from-other-weights"
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert prepare_exports(topo_path, quiet=True) == [path]
    assert export_fingerprint(path) == smollm2.fingerprint
    assert not path.with_name("exit-12.partial").exists()
