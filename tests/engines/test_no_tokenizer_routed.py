"""A routed request through nodes without a tokenizer: it escalates from a model with one
(smollm2, behind a scripted engine) across models into one without (`big`, whose path holds no
tokenizer, behind two scripted engines), whose engine cuts the stream; the router fails over to
the other `big` node, which continues from the relayed text with no token lost or repeated."""

from __future__ import annotations

import contextlib
import threading
import time

from ruyiflow.cloud_node.daemon import open_cloud_backend
from ruyiflow.cluster.topology_yaml import parse_topology
from ruyiflow.local_cluster import free_ports
from ruyiflow.node.daemon import run_node
from ruyiflow.router.client import RouterClient
from ruyiflow.router.daemon import RouterDaemon
from tests.engines.scripted_engine import MODEL, PIECES, ScriptedEngine

NODE = """
  - {{name: {name}, tier: cloud, listen: '127.0.0.1:{listen}', metrics: '127.0.0.1:{metrics}',
     model: {model}, exits: [{exit}], backend: openai, base_url: '{base_url}',
     served_model: {served}, timeout_s: 1.5, max_context: 1024}}"""
TOPOLOGY = """
models:
  smollm2: {{path: smollm2, extra_exits: [12, 16, 20, 24]}}
  big: {{path: {big_path}}}
nodes:{nodes}
router:
  listen: '127.0.0.1:{router}'
  metrics: '127.0.0.1:{router_metrics}'
  http: ''
  model: smollm2
  thresholds: [{{below: 0.9, exit: 24}}, {{model: big, exit: 31}}]
  handoff: {{mode: auto, max_retries: 2, push: false}}
"""


def node_entries(engines, ports, model_of, exit_of) -> str:
    return "".join(
        NODE.format(
            name=name,
            listen=next(ports),
            metrics=next(ports),
            base_url=engine.base_url,
            model=model_of(name),
            exit=exit_of(name),
            served=MODEL,
        )  # fmt: skip
        for name, engine in engines.items()
    )


@contextlib.contextmanager
def routed(topology, engines):
    """The nodes (in threads) and a router of `topology`; a client once every node is healthy.
    Stops them and the scripted engines afterwards."""
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=run_node,
            args=(topology, name, "cloud", stop),
            kwargs={"open_backend": open_cloud_backend},
            daemon=True,
        )
        for name in engines
    ]
    for thread in threads:
        thread.start()
    router = RouterDaemon(topology).start()
    try:
        with RouterClient(topology.router.listen, timeout=20) as client:
            deadline = time.monotonic() + 30
            while not all(n.healthy for n in client.list_nodes()):
                assert time.monotonic() < deadline, "nodes never became healthy"
                time.sleep(0.2)
            yield client
    finally:
        router.stop(grace=1)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for engine in engines.values():
            engine.stop()


def test_failover_from_a_node_without_tokenizer_resumes_from_the_relayed_text(tmp_path):
    engines = {name: ScriptedEngine().start() for name in ("small", "big-0", "big-1")}
    shared = [1]  # whichever big node gets the request first cuts its stream, once
    for name in ("big-0", "big-1"):
        engines[name].mode, engines[name].cuts_left = "cut_once", shared
    ports = iter(free_ports(8))
    nodes = node_entries(
        engines,
        ports,
        lambda name: "smollm2" if name == "small" else "big",
        lambda name: 24 if name == "small" else 31,
    )
    (tmp_path / "big").mkdir()  # weights elsewhere, and no tokenizer.json here
    topology = parse_topology(
        TOPOLOGY.format(
            big_path=tmp_path / "big", nodes=nodes, router=next(ports), router_metrics=next(ports)
        )
    )
    with routed(topology, engines) as client:
        escalation = {"enabled": True, "force_after_tokens": 2}
        chunks = list(client.generate("Capital?", max_tokens=8, exit=24, escalation=escalation))
    offset = 0
    for chunk in chunks:
        assert chunk.token_offset == offset  # nothing lost, nothing repeated
        offset += len(chunk.token_ids)
    assert offset == 8
    spans = [s.node for s in chunks[-1].trace.spans]
    assert spans[0] == "small" and sorted(spans[1:]) == ["big-0", "big-1"]
    assert chunks[-1].trace.num_retries == 1
    first, second = spans[1], spans[2]
    relayed = "".join(PIECES[:2]) * 2  # two tokens from small, two from the cut stream
    (cut,) = engines[first].streamed()
    assert cut["messages"][-1] == {"role": "assistant", "content": "".join(PIECES[:2])}
    (resumed,) = engines[second].streamed()
    assert resumed["messages"][-1] == {"role": "assistant", "content": relayed}
    assert resumed["continue_final_message"] is True and resumed["max_tokens"] == 8 - 4
    text = "".join(c.text for c in chunks)
    assert text == relayed + "".join(PIECES[:4])


DIRECT = """
models:
  big: {{path: {big_path}}}
nodes:{nodes}
router:
  listen: '127.0.0.1:{router}'
  metrics: '127.0.0.1:{router_metrics}'
  http: ''
  model: big
  thresholds: [{{exit: 31}}]
  handoff: {{mode: auto, max_retries: 2, push: false}}
"""


def test_a_request_started_on_a_node_without_tokenizer_fails_over_by_text(tmp_path):
    """No move across models first: the relayed ids are unknown ones, so the router must resume
    from the relayed text (ids it cannot know would be refused by the next node)."""
    engines = {name: ScriptedEngine().start() for name in ("big-0", "big-1")}
    shared = [1]
    for engine in engines.values():
        engine.mode, engine.cuts_left = "cut_once", shared
    ports = iter(free_ports(6))
    nodes = node_entries(engines, ports, lambda _: "big", lambda _: 31)
    (tmp_path / "big").mkdir()
    topology = parse_topology(
        DIRECT.format(
            big_path=tmp_path / "big", nodes=nodes, router=next(ports), router_metrics=next(ports)
        )
    )
    with routed(topology, engines) as client:
        chunks = list(client.generate("Capital?", max_tokens=6))
    offset = 0
    for chunk in chunks:
        assert chunk.token_offset == offset
        offset += len(chunk.token_ids)
    assert offset == 6
    first, second = [s.node for s in chunks[-1].trace.spans]
    assert {first, second} == {"big-0", "big-1"}
    (resumed,) = engines[second].streamed()
    assert resumed["messages"][-1] == {"role": "assistant", "content": "".join(PIECES[:2])}
    assert "".join(c.text for c in chunks) == "".join(PIECES[:2]) + "".join(PIECES[:4])
