"""`ruyiflow bench cluster --tls`: what mTLS costs the cluster, plaintext and mTLS measured in
one run on this machine with the default layout (router, edge-0, cloud-0 on loopback): the
router-added time to first token at one stream (p50 through the router minus p50 straight to the
node, one token, calls alternated) and the throughput of a pushed hidden-state handoff edge-0 ->
cloud-0 (bytes over the move's duration in the route trace). Target: mTLS adds < 1 ms to the
router's TTFT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690]
TLS_BLOCK = "tls: {{dir: certs, require_client_cert: true}}\n"


def _first_chunk_s(stream) -> float:  # noqa: ANN001
    started = time.perf_counter()
    for _ in stream:
        elapsed = time.perf_counter() - started
        break
    for _ in stream:  # read to the end: the next call starts on an idle node
        pass
    return elapsed


def measure(root: Path, secure: bool, args: argparse.Namespace) -> dict:
    from ruyiflow.cluster.access import ROUTER, dialer_for
    from ruyiflow.cluster.tls import tls_files
    from ruyiflow.cluster.topology_yaml import load_topology
    from ruyiflow.cmd_certs import make_certs
    from ruyiflow.cmd_up import Cluster
    from ruyiflow.local_cluster import TOPOLOGY, write_topology
    from ruyiflow.proto import ruyiflow_pb2 as pb
    from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
    from ruyiflow.router.client import RouterClient

    root.mkdir(parents=True)
    path = root / "topology.yaml"
    ports = write_topology(path, TOPOLOGY + (TLS_BLOCK if secure else ""))
    if secure:
        make_certs(path, root / "certs")
    topology = load_topology(path)
    cluster = Cluster(str(path), log_dir=root / "logs")
    cluster.start(quiet=True)
    try:
        cluster.wait_healthy(timeout=600, progress=False)
        router = f"127.0.0.1:{ports['router']}"
        client = RouterClient(router, timeout=120, tls=tls_files(topology, "operator"))
        node = pb_grpc.NodeStub(
            dialer_for(topology, ROUTER).channel(f"127.0.0.1:{ports['edge']}", peer="edge-0")
        )
        request = pb.GenerateRequest(
            request_id="bench",
            token_ids=pb.TokenIds(ids=PROMPT),
            sampling=pb.SamplingParams(max_tokens=1),
            overrides=pb.Overrides(exit=12),
        )
        via_router, direct = [], []
        for i in range(args.tls_requests + 3):  # 3 warm-up rounds
            r = _first_chunk_s(client.generate(token_ids=PROMPT, max_tokens=1, exit=12))
            d = _first_chunk_s(node.Generate(request, timeout=120))
            if i >= 3:
                via_router.append(r)
                direct.append(d)
        rates = []
        for _ in range(args.tls_handoffs):
            done = client.complete(
                token_ids=PROMPT,
                max_tokens=6,
                exit=12,
                handoff_mode="hidden",
                escalation={"force_after_tokens": 2, "force_to_exit": 20},
            )
            (move,) = done.trace.handoffs
            rates.append(move.num_bytes / (move.duration_ms / 1e3) / 1e6)
            handoff_bytes = move.num_bytes
        client.close()
    finally:
        cluster.stop(grace=5)
    router_p50, direct_p50 = statistics.median(via_router), statistics.median(direct)
    return {
        "mode": "mtls" if secure else "plaintext",
        "router_ttft_p50_ms": router_p50 * 1e3,
        "node_ttft_p50_ms": direct_p50 * 1e3,
        "router_added_ms": (router_p50 - direct_p50) * 1e3,
        "handoff_bytes": handoff_bytes,
        "handoff_mb_s": statistics.median(rates),
    }


def run_tls(args: argparse.Namespace) -> int:
    """`bench cluster --tls` (its options `--tls-requests`, `--tls-handoffs`, `--json`)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(Path(tmp) / m, m == "mtls", args) for m in ("plaintext", "mtls")]
    plain, secure = rows
    extra = secure["router_added_ms"] - plain["router_added_ms"]
    ratio = secure["handoff_mb_s"] / plain["handoff_mb_s"]
    if args.json:
        print(json.dumps({"rows": rows, "mtls_extra_ms": extra, "handoff_ratio": ratio}))
        return 0
    print(
        f"{'mode':<10} {'router TTFT':>12} {'node TTFT':>10} {'router-added':>13} {'handoff':>12}"
    )
    for r in rows:
        print(
            f"{r['mode']:<10} {r['router_ttft_p50_ms']:>10.2f}ms {r['node_ttft_p50_ms']:>8.2f}ms "
            f"{r['router_added_ms']:>11.2f}ms {r['handoff_mb_s']:>8.0f}MB/s"
        )
    print(
        f"mTLS adds {extra:+.2f} ms to the router-added TTFT p50 (target < 1 ms); pushed handoff "
        f"of {secure['handoff_bytes']} bytes: {ratio:.2f}x plaintext throughput"
    )
    return 0
