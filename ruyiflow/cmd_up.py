"""`ruyiflow up`: start every process of a topology on this machine (router + one daemon per
node, and first the external engines nodes name in `command:`), wait until all report healthy,
optionally show a few routed queries, and stop them all on Ctrl-C / SIGTERM. Engines are
restarted when they die (`ruyiflow.engine_process`); a daemon that dies stops everything."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ruyiflow.engine_process import EngineProcess, EngineSupervisor, engine_processes

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Prove that the square root of 2 is irrational, step by step, then write Python code that "
    "checks the first 1000 rational approximations.",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--topology", default="topology.yaml", help="topology file (default ./topology.yaml)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for health")
    p.add_argument("--demo", action="store_true", help="send a few queries once healthy")
    p.add_argument("--exit-after-demo", action="store_true", help="stop everything after --demo")


def health(address: str, timeout: float = 1.0) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE for a gRPC health endpoint."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def processes(topology_path: str) -> list[tuple[str, list[str], str]]:
    """(name, argv, gRPC address) of every process the topology runs here."""
    from ruyiflow.cluster.topology_yaml import load_topology

    topo = load_topology(topology_path)
    base = [sys.executable, "-m", "ruyiflow"]
    procs = [
        (n.name, [*base, n.tier, "--name", n.name, "--topology", topology_path], n.listen)
        for n in topo.nodes
    ]
    procs.append(("router", [*base, "router", "--topology", topology_path], topo.router.listen))
    return procs


class Cluster:
    """Child processes of one topology; `stop` sends SIGTERM, then SIGKILL after a grace."""

    def __init__(self, topology_path: str, log_dir: Path | None = None, only: tuple[str, ...] = ()):
        self.topology_path = topology_path
        from ruyiflow.cluster.topology_yaml import load_topology

        self.specs = [s for s in processes(topology_path) if not only or s[0] in only]
        self.children: dict[str, subprocess.Popen] = {}
        self.log_dir = log_dir
        engines = engine_processes(load_topology(topology_path), log_dir)
        self.engines = EngineSupervisor([e for e in engines if not only or e.node in only])

    def start(self, quiet: bool = False) -> None:
        """Make missing ONNX exports (onnxruntime nodes), then start every process."""
        from ruyiflow.onnx_exports import prepare_exports

        prepare_exports(self.topology_path, quiet=quiet)
        self.engines.quiet = quiet
        self.engines.start()
        for name, argv, _ in self.specs:
            out = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the child)
            self.children[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT if out else None
            )

    def wait_healthy(self, timeout: float, progress: bool = True) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            states = {e.name: engine_state(e) for e in self.engines.engines}
            states.update({name: health(addr) for name, _, addr in self.specs})
            dead = [n for n, p in self.children.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"process(es) exited during start-up: {', '.join(dead)}")
            line = "  ".join(f"{n}: {s.lower()}" for n, s in states.items())
            if progress and line != last:
                print(f"[up] {line}", file=sys.stderr, flush=True)
                last = line
            if all(s == "SERVING" for s in states.values()) and self._router_sees_nodes():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {line}")
            time.sleep(0.5)

    def _router_sees_nodes(self) -> bool:
        """The router has polled every node healthy (its registry lags process health)."""
        import grpc

        from ruyiflow.cluster.api_keys import client_key, key_metadata
        from ruyiflow.cluster.topology_yaml import load_topology
        from ruyiflow.proto import ruyiflow_pb2 as pb
        from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc

        router = [addr for name, _, addr in self.specs if name == "router"]
        if not router:
            return True
        keys_env = load_topology(self.topology_path).router.api_keys_env
        metadata = key_metadata(client_key(None, keys_env))
        with grpc.insecure_channel(router[0]) as channel:
            try:
                reply = pb_grpc.RouterStub(channel).ListNodes(
                    pb.ListNodesRequest(), timeout=2, metadata=metadata
                )
            except grpc.RpcError:
                return False
        return all(n.healthy for n in reply.nodes)

    def stop(self, grace: float = 15.0) -> None:
        for p in self.children.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.children.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.engines.stop(grace=max(1.0, deadline - time.monotonic()))


def engine_state(engine: EngineProcess) -> str:
    """SERVING once an engine's /v1/models answers, else STARTING (or EXITED)."""
    if engine.is_answering(timeout=0.5):
        return "SERVING"
    return "STARTING" if engine.is_alive() else "EXITED"


def demo(router_address: str, api_key: str | None = None) -> None:
    from ruyiflow.router.client import RouterClient, format_trace

    print(
        f"\n[up] demo: {len(DEMO_PROMPTS)} queries, an easy one and a hard one; each answer is "
        "followed by its route (difficulty score, then the node, tier and exit of each span)",
        flush=True,
    )
    with RouterClient(router_address, api_key=api_key) as client:
        for prompt in DEMO_PROMPTS:
            print(f"\n>>> {prompt}", flush=True)
            result = client.complete(prompt, max_tokens=48)
            print(result.text)
            print(format_trace(result.trace), flush=True)


def run(args: argparse.Namespace) -> int:
    if not Path(args.topology).is_file():
        print(f"ruyiflow up: topology file {args.topology} not found", file=sys.stderr)
        return 2
    cluster = Cluster(args.topology)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster.start()
    try:
        cluster.wait_healthy(args.timeout)
        router = next(addr for name, _, addr in cluster.specs if name == "router")
        print(
            f"[up] all healthy; router at {router}. Query with: ruyiflow query --router {router} "
            '"your prompt"   (Ctrl-C stops everything)',
            file=sys.stderr,
            flush=True,
        )
        if args.demo:
            from ruyiflow.cluster.api_keys import client_key
            from ruyiflow.cluster.topology_yaml import load_topology

            demo(router, client_key(None, load_topology(args.topology).router.api_keys_env))
            if args.exit_after_demo:
                return 0
        while not stop.wait(1.0):
            dead = [n for n, p in cluster.children.items() if p.poll() is not None]
            if dead:
                print(f"[up] process(es) exited: {', '.join(dead)}; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        print("[up] stopping", file=sys.stderr, flush=True)
        cluster.stop()
