"""The whole system on loopback: router + edge-0 + cloud-0 as real processes. Routing by
difficulty, escalation mid-generation (same node and across nodes, both handoff modes) with
greedy equivalence, bad input, metrics over HTTP, a real Prometheus and promtool."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import grpc
import pytest

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.client import RouterClient

EASY = "What is the capital of France?"
HARD = (
    "Prove step by step that there are infinitely many primes, then write Python code that "
    "computes the first 100 primes and explain its complexity."
)


@pytest.fixture(scope="module")
def client(cluster):
    with RouterClient(cluster.addr["router"]) as c:
        yield c


def chat_ids(smollm2, prompt: str) -> list[int]:
    tok = smollm2.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))


def destination_tokens(smollm2, prefix: list[int], exit_layer: int, n: int) -> list[int]:
    """What the destination exit yields greedily from the same prefix (the oracle)."""
    if n == 0:
        return []
    params = SamplingParams(max_tokens=n)
    return [e.token_id for e in Engine(smollm2).generate(prefix, params, exit_layer)]


def test_easy_goes_to_edge_and_hard_to_cloud(client):
    easy = client.complete(EASY, max_tokens=8)
    hard = client.complete(HARD, max_tokens=8)
    assert easy.trace.spans[0].tier == pb.TIER_EDGE
    assert hard.trace.spans[0].tier == pb.TIER_CLOUD
    assert easy.trace.difficulty < hard.trace.difficulty
    assert easy.trace.timing.ttft_ms > 0 and easy.trace.timing.total_ms >= easy.trace.timing.ttft_ms
    route = client.route(HARD)
    assert route.tier == pb.TIER_CLOUD and route.node == "cloud-0"


def test_escalation_on_the_same_node(client, smollm2):
    result = client.complete(EASY, max_tokens=16, exit=12, escalation={"force_after_tokens": 4})
    spans = [(s.node, s.exit, s.num_tokens) for s in result.trace.spans]
    assert spans[0] == ("edge-0", 12, 4) and spans[1][:2] == ("edge-0", 16)
    move = result.trace.handoffs[0]
    assert move.from_node == move.to_node == "edge-0" and move.num_bytes == 0
    prefix = chat_ids(smollm2, EASY) + result.token_ids[:4]
    assert result.token_ids[4:] == destination_tokens(
        smollm2, prefix, 16, len(result.token_ids) - 4
    )


@pytest.mark.parametrize("mode", ["hidden", "tokens"])
def test_escalation_across_nodes_equals_destination_branch(client, smollm2, mode):
    result = client.complete(
        EASY, max_tokens=16, exit=16, handoff_mode=mode, escalation={"force_after_tokens": 5}
    )
    nodes = [(s.node, s.exit) for s in result.trace.spans]
    assert nodes[0] == ("edge-0", 16) and nodes[1][0] == "cloud-0"
    handoff = result.trace.handoffs[0]
    assert handoff.from_node == "edge-0" and handoff.to_node == "cloud-0"
    assert (
        handoff.mode == {"hidden": pb.HANDOFF_MODE_HIDDEN, "tokens": pb.HANDOFF_MODE_TOKENS}[mode]
    )
    assert handoff.num_bytes > 0 and handoff.duration_ms > 0
    to_exit = nodes[1][1]
    prefix = chat_ids(smollm2, EASY) + result.token_ids[:5]
    assert result.token_ids[5:] == destination_tokens(
        smollm2, prefix, to_exit, len(result.token_ids) - 5
    )


def test_bad_input_gets_a_status_and_the_router_keeps_serving(client):
    cases = [
        (dict(prompt=""), "empty"),
        (dict(prompt="x" * 100_000), "prompt"),
        (dict(prompt=EASY, exit=13), "exit"),
        (dict(prompt=EASY, node="nope"), "node"),
    ]
    for kwargs, match in cases:
        prompt = kwargs.pop("prompt")
        with pytest.raises(grpc.RpcError) as err:
            client.complete(prompt, max_tokens=4, **kwargs)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kwargs
        assert match in err.value.details().lower()
    assert client.complete(EASY, max_tokens=3).token_ids


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_a_known_sequence(client, cluster):
    before = scrape(cluster.addr["router_m"])
    edge_before = scrape(cluster.addr["edge_m"])
    for _ in range(2):
        client.complete(EASY, max_tokens=4, exit=12)
    client.complete(EASY, max_tokens=4, exit=29)
    after = scrape(cluster.addr["router_m"])
    edge_after = scrape(cluster.addr["edge_m"])
    name = "ruyiflow_router_requests_total"
    assert (
        sample(after, name, tier="edge", exit="12") - sample(before, name, tier="edge", exit="12")
        == 2
    )
    assert (
        sample(after, name, tier="cloud", exit="29") - sample(before, name, tier="cloud", exit="29")
        == 1
    )
    tokens = "ruyiflow_node_tokens_generated_total"
    assert sample(edge_after, tokens, exit="12") - sample(edge_before, tokens, exit="12") == 8
    assert sample(after, "ruyiflow_router_node_up", node="edge-0") == 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_every_exposition(cluster):
    for key in ("router_m", "edge_m", "cloud_m"):
        result = subprocess.run(
            ["promtool", "check", "metrics"],
            input=scrape(cluster.addr[key]),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, (key, result.stdout, result.stderr)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus not installed")
def test_real_prometheus_scrapes_every_target_up(cluster, tmp_path):
    from tests.cluster.conftest import free_ports

    port = free_ports(1)[0]
    targets = [cluster.addr[k] for k in ("router_m", "edge_m", "cloud_m")]
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "ruyiflow", "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        health = {}
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/targets", timeout=2
                ) as r:
                    active = json.load(r)["data"]["activeTargets"]
                health = {t["scrapeUrl"]: t["health"] for t in active}
                if len(health) == 3 and all(h == "up" for h in health.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert len(health) == 3 and all(h == "up" for h in health.values()), health
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_query_cli_prints_answer_and_trace(cluster):
    import sys

    cmd = [
        sys.executable,
        "-m",
        "ruyiflow",
        "query",
        "--router",
        cluster.addr["router"],
        "--max-tokens",
        "4",
        "--exit",
        "20",
    ]
    result = subprocess.run([*cmd, "--json", "Hi"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 4 and out["trace"]["spans"][0]["node"] == "cloud-0"
    result = subprocess.run([*cmd, "Hi"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "cloud-0" in result.stderr and "route" in result.stderr
