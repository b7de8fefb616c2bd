"""`ruyiflow bench cluster --engine`: what a `backend: openai` cloud node and the router add in
front of an external engine. A local cluster (router, edge-0, cloud-llama in front of a
llama.cpp server, `local_cluster.ENGINE_TOPOLOGY`); time to first token and inter-token latency,
p50/p99, of the same greedy request (the chat-templated prompt the node sends) through the
router (gRPC, exit 29) vs a streamed `/v1/completions` straight to the llama.cpp server, at 1
and 16 concurrent streams. Each round runs both probes back to back, in alternating order, so
a machine whose load drifts loads both alike. llama.cpp's server runs one request at a time:
at 16 streams TTFT is mostly its queue, the same for both."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from ruyiflow.bench.cluster import percentile
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.client import build_request

QUESTION = "What is the capital of France?"
IDLE_S = 5.0
Timing = tuple[float, list[float]]  # (TTFT, inter-token gaps), seconds


class DirectProbe:
    """A streamed `/v1/completions` on the engine with the body the node sends for greedy;
    one keep-alive connection per thread."""

    HEADERS = {"content-type": "application/json"}

    def __init__(self, address: str, prompt: str, max_tokens: int) -> None:
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self._local = threading.local()
        self.body = json.dumps(
            {
                "model": "smollm2",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "top_p": 1.0,
                "top_k": 0,
                "min_p": 0.0,
                "repeat_penalty": 1.0,
                "repetition_penalty": 1.0,
                "logprobs": 2,
                "stream": True,
            }  # fmt: skip
        ).encode()

    def __call__(self) -> Timing:
        for _ in range(2):  # the server may have closed an idle keep-alive connection
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = http.client.HTTPConnection(self.host, self.port)
            started = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", self.body, self.HEADERS)
                response = conn.getresponse()
                break
            except (ConnectionError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
        else:
            raise ConnectionError(f"engine at {self.host}:{self.port} refused twice")
        stamps = []
        for line in response:
            if line.startswith(b"data: [DONE]"):
                break
            if line.startswith(b"data: {") and b'"text": ""' not in line:
                stamps.append(time.perf_counter())
        response.read()
        return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def router_probe(stub: pb_grpc.RouterStub, max_tokens: int) -> Timing:
    request = build_request(QUESTION, max_tokens=max_tokens, exit=29)
    started, stamps = time.perf_counter(), []
    for chunk in stub.Generate(request):
        if chunk.token_ids:
            stamps.append(time.perf_counter())
    return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    addr: dict[str, str],
    pids: dict[str, int],
    prompt: str,
    streams: int,
    rounds: int,
    max_tokens: int,
) -> dict:
    with grpc.insecure_channel(addr["router"]) as channel:
        stub = pb_grpc.RouterStub(channel)
        probes = {
            "direct": DirectProbe(addr["engine"], prompt, max_tokens),
            "router": lambda: router_probe(stub, max_tokens),
        }

        def one_round(i: int) -> dict[str, Timing]:
            order = ["direct", "router"] if i % 2 else ["router", "direct"]
            return {name: probes[name]() for name in order}

        with ThreadPoolExecutor(streams) as pool:
            list(pool.map(one_round, range(streams)))  # warm connections
            idle = {name: cpu_seconds(pid) for name, pid in pids.items()}
            time.sleep(IDLE_S)  # what the processes burn with nothing to do (polls, timers)
            idle = {name: (cpu_seconds(pid) - idle[name]) / IDLE_S for name, pid in pids.items()}
            load_start = os.getloadavg()[0]
            cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
            started = time.monotonic()
            results = list(pool.map(one_round, range(rounds)))
            elapsed = time.monotonic() - started
            cpu = {
                name: cpu_seconds(pid) - cpu_start[name] - idle[name] * elapsed
                for name, pid in pids.items()
            }
    # the machine's 1-minute load over the level: latencies on a shared machine depend on it
    out: dict[str, float] = {
        "streams": streams,
        "load_1m_start": load_start,
        "load_1m_end": os.getloadavg()[0],
        # CPU time per request beyond the processes' idle rate, whatever the machine's load:
        # what the routed path costs (router + node, per routed request) beside the engine
        # (per request, both probes)
        "path_cpu_ms_per_request": (cpu["router"] + cpu["node"]) / rounds * 1e3,
        "engine_cpu_ms_per_request": cpu["engine"] / (2 * rounds) * 1e3,
    }
    for name in ("direct", "router"):
        ttft = [r[name][0] for r in results]
        itl = [gap for r in results for gap in r[name][1]]
        out |= {
            f"{name}_ttft_p50_ms": statistics.median(ttft) * 1e3,
            f"{name}_ttft_p99_ms": percentile(ttft, 0.99) * 1e3,
            f"{name}_itl_p50_ms": statistics.median(itl) * 1e3,
            f"{name}_itl_p99_ms": percentile(itl, 0.99) * 1e3,
        }
    out["added_ttft_p50_ms"] = out["router_ttft_p50_ms"] - out["direct_ttft_p50_ms"]
    out["added_ttft_share"] = out["added_ttft_p50_ms"] / out["direct_ttft_p50_ms"]
    return out


def run_engine(args: argparse.Namespace) -> int:
    from ruyiflow.cloud_node.openai_node import load_tokenizer
    from ruyiflow.local_cluster import ENGINE_TOPOLOGY, start_local_cluster

    tokenizer = load_tokenizer("smollm2")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    levels = [int(s) for s in args.engine_streams.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        # llama.cpp's server runs one request at a time: at 16 streams a request can wait in
        # its queue longer than the node's 30 s read timeout on a loaded machine
        template = ENGINE_TOPOLOGY.replace("timeout_s: 30", "timeout_s: 600")
        cluster = start_local_cluster(Path(tmp), template=template)
        try:
            pids = {
                "router": cluster.supervisor.children["router"].proc.pid,
                "node": cluster.supervisor.children["cloud-llama"].proc.pid,
                "engine": cluster.engines.engines[0].proc.pid,
            }
            rows = [
                measure(cluster.addr, pids, prompt, streams, args.requests, args.max_tokens)
                for streams in levels
            ]
        finally:
            cluster.stop(grace=5)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        "router + backend: openai node in front of llama.cpp's server, vs the server directly "
        f"({args.requests} requests of {args.max_tokens} greedy tokens per level; "
        f"{os.cpu_count()} CPUs)"
    )
    print(
        f"{'streams':>7} {'TTFT direct p50/p99':>20} {'via router p50/p99':>20} "
        f"{'added p50':>10} {'of TTFT':>8} {'ITL direct p50/p99':>19} {'via router':>15}"
        f" {'load 1m':>11} {'CPU/req router+node, engine':>28}"
    )
    for r in rows:
        print(
            f"{r['streams']:>7} {r['direct_ttft_p50_ms']:>9.1f} /{r['direct_ttft_p99_ms']:>7.1f} ms"
            f" {r['router_ttft_p50_ms']:>9.1f} /{r['router_ttft_p99_ms']:>7.1f} ms"
            f" {r['added_ttft_p50_ms']:>7.2f} ms {100 * r['added_ttft_share']:>7.1f}%"
            f" {r['direct_itl_p50_ms']:>8.1f} /{r['direct_itl_p99_ms']:>6.1f} ms"
            f" {r['router_itl_p50_ms']:>6.1f} /{r['router_itl_p99_ms']:>6.1f} ms"
            f" {r['load_1m_start']:>5.1f}-{r['load_1m_end']:<5.1f}"
            f" {r['path_cpu_ms_per_request']:>12.1f} ms, {r['engine_cpu_ms_per_request']:>7.1f} ms"
        )
    return 0
