"""A Ruyi-style family beside an MoE model, as real processes: the router sends the hardest
scores to the MoE node (a threshold naming that model), and an edge request escalating past the
family's deepest served exit moves across models as text, which the MoE node re-encodes with its
own tokenizer. Greedy oracles: the MoE engine run locally on the same prompt and prefix text."""

from __future__ import annotations

import pytest

from ruyiflow.cmd_up import Cluster
from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.local_cluster import free_ports
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.client import RouterClient
from tests.moe.tiny_moe import save_moe

EASY = "What is the capital of France?"
HARD = (
    "Prove step by step that there are infinitely many primes, then write Python code that "
    "computes the first 100 primes and explain its complexity."
)
MOE_EXIT = 1  # the tiny Hunyuan MoE has 2 layers: its one exit is layer 1

TOPOLOGY = """
models:
  smollm2: {{path: smollm2, extra_exits: [12, 16, 20, 24]}}
  moe: {{path: {moe}}}
nodes:
  - {{name: edge-0, tier: edge, listen: '127.0.0.1:{p[0]}', metrics: '127.0.0.1:{p[1]}',
      model: smollm2, exits: [12], max_context: 1024}}
  - {{name: cloud-moe, tier: cloud, listen: '127.0.0.1:{p[2]}', metrics: '127.0.0.1:{p[3]}',
      model: moe, exits: [{exit}], max_batch: 4, max_context: 512}}
router:
  listen: '127.0.0.1:{p[4]}'
  metrics: '127.0.0.1:{p[5]}'
  http: ''  # no OpenAI API: its default port may be taken
  model: smollm2
  thresholds:
    - {{below: 0.5, exit: 12}}
    - {{model: moe, exit: {exit}}}
  escalation: {{enabled: false}}
  grace_period_s: 2
"""


@pytest.fixture(scope="module")
def moe_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-cluster")
    save_moe(root / "moe", "hunyuan_v1_moe")
    ports = free_ports(6)
    topo = root / "topology.yaml"
    topo.write_text(TOPOLOGY.format(moe=root / "moe", p=ports, exit=MOE_EXIT))
    cluster = Cluster(str(topo), log_dir=root / "logs")
    cluster.start()
    try:
        cluster.wait_healthy(timeout=300, progress=False)
        with RouterClient(f"127.0.0.1:{ports[4]}") as client:
            yield client, load_model(str(root / "moe"))
    finally:
        cluster.stop(grace=5)


def moe_continuation(moe, prompt: str, prefix_text: str, num_tokens: int) -> str:
    """Greedy text the MoE model adds after the templated prompt and `prefix_text`."""
    tok = moe.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))
    prefix = tok.encode(prefix_text)
    engine = Engine(moe)
    params = SamplingParams(max_tokens=len(prefix) + num_tokens)
    seq = engine.add_request(prompt_ids, params, prefix_ids=prefix)
    text = ""
    while engine.has_work():
        text += "".join(e.text for e in engine.step() if e.seq_id == seq)
    return text


def test_hardest_scores_go_to_the_moe_node(moe_cluster):
    client, moe = moe_cluster
    hard = client.complete(HARD, max_tokens=6)
    easy = client.complete(EASY, max_tokens=6)
    assert [s.node for s in hard.trace.spans] == ["cloud-moe"]
    assert hard.trace.spans[0].tier == pb.TIER_CLOUD and hard.trace.spans[0].exit == MOE_EXIT
    assert [s.node for s in easy.trace.spans] == ["edge-0"]
    assert hard.text == moe_continuation(moe, HARD, "", 6)
    route = client.route(HARD)
    assert route.node == "cloud-moe"


def test_escalation_crosses_models_as_text(moe_cluster):
    client, moe = moe_cluster
    chunks = list(client.generate(EASY, max_tokens=10, escalation={"force_after_tokens": 4}))
    trace = chunks[-1].trace
    assert [s.node for s in trace.spans] == ["edge-0", "cloud-moe"]
    (move,) = trace.handoffs
    assert move.mode == pb.HANDOFF_MODE_TOKENS and move.to_node == "cloud-moe"
    assert trace.spans[0].num_tokens == 4
    # The MoE node continued from exactly the text the client had seen, for what was left of
    # max_tokens, in its own tokenizer's tokens.
    edge_text = "".join(c.text for c in chunks if c.source.node == "edge-0")
    moe_text = "".join(c.text for c in chunks if c.source.node == "cloud-moe")
    assert edge_text
    assert moe_text == moe_continuation(moe, EASY, edge_text, 6)
    offsets = [c.token_offset for c in chunks if c.token_ids]
    assert offsets == sorted(offsets) and offsets[0] == 0
