"""`ruyiflow bench cluster`: what the router costs and what a handoff costs, on a local cluster
(router + edge-0 + cloud-0 on loopback), each figure against a baseline measured in the same run:
router-added time to first token vs calling the node directly (1/16/64 concurrent streams),
through the router's gRPC API and its OpenAI HTTP API (a streamed `/v1/completions`, same
prompt and exit), handoff `hidden` vs `tokens` (bytes, milliseconds) at 128/512/2048 tokens of
context, and the requests/s the router sustains. `--engine`: the same through a `backend:
openai` node in front of a llama.cpp server vs that server directly (bench/cluster_engine.py).
`--tls`: plaintext vs mTLS clusters in one run (bench/tls.py)."""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.client import RouterClient, build_request

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--streams", default="1,16,64", help="concurrency levels")
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    p.add_argument("--contexts", default="128,512,2000", help="handoff context lengths")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--engine",
        action="store_true",
        help="router + openai node vs a llama.cpp server directly (needs the engines extra)",
    )
    p.add_argument("--engine-streams", default="1,16", help="--engine: concurrency levels")
    p.add_argument("--max-tokens", type=int, default=16, help="--engine: tokens per request")
    p.add_argument(
        "--tls",
        action="store_true",
        help="plaintext vs mTLS: router-added TTFT and pushed handoff throughput (bench/tls.py)",
    )
    p.add_argument("--tls-requests", type=int, default=40, help="--tls: TTFT samples per path")
    p.add_argument("--tls-handoffs", type=int, default=5, help="--tls: handoffs per mode")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _ttft(stub: pb_grpc.NodeStub | pb_grpc.RouterStub) -> float:
    """Seconds to the first chunk of a 2-token request at exit 12 (Node and Router take the
    same GenerateRequest), reading the stream to its end."""
    request = build_request(token_ids=PROMPT, max_tokens=2, exit=12, request_id=uuid.uuid4().hex)
    started = time.perf_counter()
    stream = stub.Generate(request)
    next(iter(stream))
    first = time.perf_counter() - started
    for _ in stream:
        pass
    return first


class HttpProbe:
    """TTFT of a streamed `/v1/completions` (the same token-id prompt, 2 tokens at exit 12):
    seconds to the first event, reading the stream to its end; one keep-alive connection per
    thread, as an OpenAI client keeps."""

    def __init__(self, address: str) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self._local = threading.local()
        self.body = json.dumps(
            {
                "model": "auto",
                "prompt": PROMPT,
                "max_tokens": 2,
                "stream": True,
                "ruyiflow": {"exit": 12},
            }
        ).encode()

    def __call__(self) -> float:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection(self.host, self.port)
        started = time.perf_counter()
        conn.request("POST", "/v1/completions", self.body, {"content-type": "application/json"})
        response = conn.getresponse()
        if not response.readline().startswith(b"data: {"):
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        first = time.perf_counter() - started
        response.read()
        return first


def added_latency(addr: dict[str, str], streams: int, requests: int) -> dict[str, float]:
    """TTFT through the router (gRPC and OpenAI HTTP) vs straight to edge-0, `streams` at a
    time. Each of `requests` rounds runs the three probes back to back, in rotating order, so
    all three see the same load on a machine whose load drifts."""
    with (
        grpc.insecure_channel(addr["edge"]) as node_ch,
        grpc.insecure_channel(addr["router"]) as r_ch,
    ):
        node, router = pb_grpc.NodeStub(node_ch), pb_grpc.RouterStub(r_ch)
        probes = {
            "direct": lambda: _ttft(node),
            "router": lambda: _ttft(router),
            "http": HttpProbe(addr["router_http"]),
        }
        names = list(probes)

        def one_round(i: int) -> dict[str, float]:
            order = names[i % 3 :] + names[: i % 3]
            return {name: probes[name]() for name in order}

        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(one_round, range(streams)))  # warm channels and connections
            rounds = list(pool.map(one_round, range(requests)))
    results = {name: [r[name] for r in rounds] for name in names}
    d50 = statistics.median(results["direct"])
    d99 = percentile(results["direct"], 0.99)
    out: dict[str, float] = {"streams": streams, "direct_p50_ms": d50 * 1e3}
    for name in ("router", "http"):
        p50 = statistics.median(results[name])
        out[f"{name}_p50_ms"] = p50 * 1e3
        out[f"{name}_added_p50_ms"] = (p50 - d50) * 1e3
        out[f"{name}_added_p99_ms"] = (percentile(results[name], 0.99) - d99) * 1e3
    out["http_minus_grpc_p50_ms"] = out["http_p50_ms"] - out["router_p50_ms"]
    return out


def handoff_cost(client: RouterClient, context: int, mode: str) -> dict[str, float]:
    ids = [(7 * i) % 4000 + 20 for i in range(context)]
    result = client.complete(
        token_ids=ids,
        max_tokens=3,
        exit=16,
        handoff_mode=mode,
        escalation={"force_after_tokens": 1},
    )
    h = result.trace.handoffs[0]
    return {"context": context, "mode": mode, "bytes": int(h.num_bytes), "ms": h.duration_ms}


def router_throughput(addr: str, requests: int, streams: int = 16) -> dict[str, float]:
    with RouterClient(addr) as client:
        started = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            list(
                pool.map(
                    lambda _: client.complete(token_ids=PROMPT, max_tokens=1, exit=12),
                    range(requests),
                )
            )
        generate_rps = requests / (time.perf_counter() - started)
        started = time.perf_counter()
        with ThreadPoolExecutor(streams) as pool:
            list(
                pool.map(
                    lambda _: client.route("What is the capital of France?"), range(requests * 4)
                )
            )
        route_rps = requests * 4 / (time.perf_counter() - started)
    return {"generate_rps": generate_rps, "route_rps": route_rps}


def run(args: argparse.Namespace) -> int:
    if args.engine and args.tls:
        print("ruyiflow bench cluster: --engine and --tls are separate runs", file=sys.stderr)
        return 2
    if args.tls:
        from ruyiflow.bench.tls import run_tls

        return run_tls(args)
    if args.engine:
        from ruyiflow.bench.cluster_engine import run_engine

        return run_engine(args)
    from ruyiflow.local_cluster import start_local_cluster

    with tempfile.TemporaryDirectory() as tmp:
        cluster = start_local_cluster(Path(tmp))
        try:
            latency = [
                added_latency(cluster.addr, int(s), args.requests) for s in args.streams.split(",")
            ]
            with RouterClient(cluster.addr["router"]) as client:
                handoffs = [
                    handoff_cost(client, int(c), m)
                    for c in args.contexts.split(",")
                    for m in ("hidden", "tokens")
                ]
            throughput = router_throughput(cluster.addr["router"], args.requests)
        finally:
            cluster.stop(grace=5)
    if args.json:
        print(
            json.dumps(
                {"latency": latency, "handoffs": handoffs, "throughput": throughput}, indent=2
            )
        )
        return 0
    print("router-added time to first token (baseline: Node.Generate on edge-0 directly)")
    print(
        f"{'streams':>8} {'api':>5} {'direct p50':>11} {'router p50':>11} "
        f"{'added p50':>10} {'added p99':>10} {'of TTFT':>8}"
    )
    for r in latency:
        for api, key in (("grpc", "router"), ("http", "http")):
            p50 = r[f"{key}_p50_ms"]
            added = r[f"{key}_added_p50_ms"]
            print(
                f"{r['streams']:>8} {api:>5} {r['direct_p50_ms']:>9.1f}ms {p50:>9.1f}ms "
                f"{added:>8.2f}ms {r[f'{key}_added_p99_ms']:>8.2f}ms {100 * added / p50:>7.1f}%"
            )
        print(f"{'':>8} HTTP minus gRPC p50: {r['http_minus_grpc_p50_ms']:+.2f} ms")
    print("\nhandoff edge-0 exit 16 -> cloud-0 (forced after 1 token)")
    print(f"{'context':>8} {'mode':>7} {'bytes':>12} {'ms':>8}")
    for h in handoffs:
        print(f"{h['context']:>8} {h['mode']:>7} {h['bytes']:>12,} {h['ms']:>8.1f}")
    print(
        f"\nrouter: {throughput['generate_rps']:.1f} Generate requests/s end to end "
        "(1 token each), "
        f"{throughput['route_rps']:.0f} Route dry runs/s"
    )
    return 0
