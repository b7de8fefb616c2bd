"""The confidence gate on real daemons over loopback: a request pinned to exit 12 is looked at
before anything streams, moved on by a branch switch (same node) and then, when exit 16 does
not pass either, by a hidden handoff of its prompt to cloud-0 (across nodes). No token comes
from an exit the gate sent the request away from, the greedy output is the exit's that serves
it, and the route trace says why. A request the thresholds send to an uncertified exit starts
at the next certified one."""

from __future__ import annotations

import pytest

from ruyiflow.cmd_up import Cluster
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.local_cluster import TOPOLOGY, free_ports
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.client import RouterClient
from ruyiflow.router.trace_view import format_trace

PASSES = "What is the capital of France?"
FAILS = "Write a haiku about the sea."
MAX_TOKENS = 10


def chat_ids(loaded, text: str) -> list[int]:
    tok = loaded.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def first_max_prob(loaded, text: str, exit_layer: int) -> float:
    engine = Engine(loaded)
    params = SamplingParams(max_tokens=1)
    seq_id = engine.add_request(chat_ids(loaded, text), params, exit_layer, hold_first=True)
    while seq_id not in engine.held:
        engine.step()
    return engine.held[seq_id].confidence.max_prob


def plain(loaded, text: str, exit_layer: int) -> list[int]:
    params = SamplingParams(max_tokens=MAX_TOKENS)
    ids = chat_ids(loaded, text)
    return [e.token_id for e in Engine(loaded).generate(ids, params, exit_layer)]


def gated_topology(loaded) -> tuple[str, float]:
    """The default test layout with a calibration certifying only exit 16, at a max_prob
    threshold between the two prompts' first-token confidence there."""
    high, low = first_max_prob(loaded, PASSES, 16), first_max_prob(loaded, FAILS, 16)
    assert high > low, (high, low)
    threshold = round((high + low) / 2, 6)
    names = ["edge", "edge_m", "cloud", "cloud_m", "router", "router_m", "router_http"]
    text = TOPOLOGY.format(**dict(zip(names, free_ports(len(names)), strict=True)))
    old = "  escalation: {enabled: false, window: 4, threshold: 0.3}\n"
    assert old in text
    calibration = f"""  escalation:
    enabled: true
    window: 4
    threshold: 0.0001          # mid-stream escalation as good as off: only the gate moves
    calibration:
      eps: 0.05
      delta: 0.1
      n: 100
      date: "2026-12-03"
      fingerprint: "{loaded.fingerprint}"
      exits:
        - {{exit: 12, measure: max_prob, threshold: null}}
        - {{exit: 16, measure: max_prob, threshold: {threshold}}}
        - {{exit: 20, measure: max_prob, threshold: null}}
        - {{exit: 24, measure: max_prob, threshold: null}}
"""
    return text.replace(old, calibration), threshold


@pytest.fixture(scope="module")
def gated(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("gated")
    text, threshold = gated_topology(smollm2)
    (root / "topology.yaml").write_text(text)
    cluster = Cluster(str(root / "topology.yaml"), log_dir=root / "logs")
    cluster.start()
    try:
        cluster.wait_healthy(timeout=300, progress=False)
        router = text.split("router:\n  listen: ")[1].split("\n")[0]
        with RouterClient(router) as client:
            yield client, threshold
    finally:
        cluster.stop(grace=5)


def test_same_node_gate_switches_before_the_first_token(gated, smollm2):
    client, threshold = gated
    result = client.complete(PASSES, max_tokens=MAX_TOKENS, exit=12)
    trace = result.trace
    assert [(s.node, s.exit, s.num_tokens) for s in trace.spans] == [
        ("edge-0", 12, 0),
        ("edge-0", 16, len(result.token_ids)),
    ]
    assert {s.exit for s in result.sources} == {16}  # nothing streamed from exit 12
    assert result.token_ids == plain(smollm2, PASSES, 16)
    (switch,) = trace.handoffs
    assert switch.from_node == switch.to_node == "edge-0" and switch.num_bytes == 0
    assert switch.reason == pb.HANDOFF_REASON_GATE
    at12, at16 = trace.gate
    assert not at12.HasField("threshold") and not at12.passed and at12.to_exit == 16
    assert at16.passed and at16.threshold == pytest.approx(threshold) and at16.node == "edge-0"
    assert at16.value >= at16.threshold and at16.confidence.max_prob == pytest.approx(at16.value)
    assert "streams from here" in format_trace(trace)


def test_cross_node_gate_hands_off_the_prompt(gated, smollm2):
    client, _ = gated
    result = client.complete(FAILS, max_tokens=MAX_TOKENS, exit=12)
    trace = result.trace
    spans = [(s.node, s.exit, s.num_tokens) for s in trace.spans]
    assert spans == [("edge-0", 12, 0), ("edge-0", 16, 0), ("cloud-0", 29, len(result.token_ids))]
    assert {(s.node, s.exit) for s in result.sources} == {("cloud-0", 29)}
    assert result.token_ids == plain(smollm2, FAILS, 29)
    switch, handoff = trace.handoffs
    assert switch.reason == handoff.reason == pb.HANDOFF_REASON_GATE
    assert (handoff.from_node, handoff.to_node, handoff.to_exit) == ("edge-0", "cloud-0", 29)
    assert handoff.mode == pb.HANDOFF_MODE_HIDDEN and handoff.num_bytes > 0  # the trunk moved
    assert [(g.exit, g.passed, g.to_exit) for g in trace.gate] == [(12, False, 16), (16, False, 29)]


def test_router_starts_at_the_next_certified_exit(gated):
    client, _ = gated
    assert client.route(PASSES).exit == 16  # the heuristic picks 12, certified nothing
    result = client.complete(PASSES, max_tokens=4)
    skipped = result.trace.gate[0]
    assert skipped.skipped and skipped.exit == 12 and skipped.to_exit == 16
    assert result.trace.spans[0].exit == 16 and result.trace.gate[1].passed
