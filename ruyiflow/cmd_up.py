"""`ruyiflow up`: start every process of a topology on this machine (the router and its
`router.replicas`, one daemon per node, and first the external engines nodes name in
`command:`), wait until all report healthy, optionally show a few routed queries, and stop them
all on Ctrl-C / SIGTERM - at any moment, start-up included. A daemon that dies is restarted
(`ruyiflow.supervisor`: a growing pause, a restart budget, counted in
`ruyiflow_up_restarts_total` on `--metrics`); only one that used up its budget stops the
cluster. Engines are restarted the same way (`ruyiflow.engine_process`). Children die with
`up`, even when it is SIGKILLed (Linux), and taken ports are reported before anything is
spawned."""

from __future__ import annotations

import argparse
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ruyiflow.engine_process import EngineProcess, EngineSupervisor, engine_processes
from ruyiflow.supervisor import Child, RestartPolicy, Supervisor

log = logging.getLogger("ruyiflow.up")


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived while `up` was still starting the cluster."""


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
    p.add_argument(
        "--metrics",
        default=None,
        metavar="HOST:PORT",
        help="serve the supervisor's /metrics (restarts per daemon) here",
    )


def health(address: str, timeout: float = 1.0, dialer=None, peer: str | None = None) -> str:  # noqa: ANN001
    """SERVING / NOT_SERVING / UNREACHABLE for a gRPC health endpoint; `dialer`
    (`cluster.access.Dialer`) for a cluster under mTLS, `peer` the name it must prove."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (
        grpc.insecure_channel(address) if dialer is None else dialer.channel(address, peer=peer)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.RpcError:
            return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def processes(topology_path: str) -> list[tuple[str, list[str], str]]:
    """(name, argv, gRPC address) of every process the topology runs here."""
    return [(c.name, c.argv, c.listen) for c in children_of(topology_path)]


def children_of(topology_path: str, log_dir: Path | None = None) -> list[Child]:
    """The supervised daemons of a topology, each with the addresses it listens on (keyed by
    topology field); the gRPC address comes first."""
    from ruyiflow.cluster.topology_yaml import load_topology

    topo = load_topology(topology_path)
    # -P: the daemons never import from the directory `up` was started in
    base = [sys.executable, "-P", "-m", "ruyiflow"]
    out = []
    for n in topo.nodes:
        argv = [*base, n.tier, "--name", n.name, "--topology", topology_path]
        addresses = {f"nodes.{n.name}.listen": n.listen, f"nodes.{n.name}.metrics": n.metrics}
        out.append(Child(n.name, argv, addresses, _log_path(log_dir, n.name)))
    addresses = {"router.listen": topo.router.listen, "router.metrics": topo.router.metrics}
    if topo.router.http:
        addresses["router.http"] = topo.router.http
    argv = [*base, "router", "--topology", topology_path]
    out.append(Child("router", argv, addresses, _log_path(log_dir, "router")))
    for i, replica in enumerate(topo.router.replicas, 1):
        name, path = f"router-{i}", f"router.replicas[{i - 1}]"
        addresses = {f"{path}.listen": replica.listen, f"{path}.metrics": replica.metrics}
        if replica.http:
            addresses[f"{path}.http"] = replica.http
        flags = ["--listen", replica.listen, "--metrics", replica.metrics, "--http", replica.http]
        out.append(Child(name, [*argv, *flags], addresses, _log_path(log_dir, name)))
    return out


def identity(child_name: str) -> str:
    """The name a child proves under mTLS: every router of the topology is `router`."""
    return "router" if is_router(child_name) else child_name


def is_router(child_name: str) -> bool:
    """`router`, or `router-N` for the Nth of `router.replicas` (no node is named so)."""
    return child_name == "router" or bool(re.fullmatch(r"router-\d+", child_name))


def _log_path(log_dir: Path | None, name: str) -> Path | None:
    return None if log_dir is None else log_dir / f"{name}.log"


class Cluster:
    """Supervised child processes of one topology; `stop` sends SIGTERM to each process
    group, then SIGKILL after a grace. `stop_event` (set by a signal) ends start-up early."""

    def __init__(
        self,
        topology_path: str,
        log_dir: Path | None = None,
        only: tuple[str, ...] = (),
        policy: RestartPolicy | None = None,
        stop_event: threading.Event | None = None,
    ):
        self.topology_path = topology_path
        from ruyiflow.cluster.topology_yaml import load_topology

        children = [c for c in children_of(topology_path, log_dir) if not only or c.name in only]
        self.supervisor = Supervisor(children, policy or RestartPolicy())
        self.specs = [(c.name, c.argv, c.listen) for c in children]
        self.log_dir = log_dir
        self.stop_event = stop_event or threading.Event()
        topology = load_topology(topology_path)
        self.dialer = None  # under mTLS, health checks show the operator's certificate
        if topology.tls is not None:
            from ruyiflow.cluster.access import OPERATOR, dialer_for

            self.dialer = dialer_for(topology, OPERATOR)
        engines = engine_processes(topology, log_dir)
        self.engines = EngineSupervisor([e for e in engines if not only or e.node in only])

    @property
    def children(self) -> dict[str, subprocess.Popen]:
        """The current process of each daemon (a restart replaces it)."""
        return {n: c.proc for n, c in self.supervisor.children.items() if c.proc is not None}

    def start(self, quiet: bool = False) -> None:
        """Make missing ONNX exports (onnxruntime nodes), check every port, then start every
        process (engines first)."""
        from ruyiflow.onnx_exports import prepare_exports
        from ruyiflow.supervisor import check_ports

        prepare_exports(self.topology_path, quiet=quiet)
        self._check_stop()
        check_ports(
            {k: v for c in self.supervisor.children.values() for k, v in c.addresses.items()}
        )
        self.engines.quiet = quiet
        self.engines.start()
        self._check_stop()
        self.supervisor.start()

    def _check_stop(self) -> None:
        if self.stop_event.is_set():
            raise Interrupted()

    def supervise(self) -> list[str]:
        """Restart daemons that died; returns those that used up their restart budget."""
        return self.supervisor.check()

    def wait_healthy(self, timeout: float, progress: bool = True) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            self._check_stop()
            states = {e.name: engine_state(e) for e in self.engines.engines}
            states.update(
                {
                    name: health(addr, 1.0, self.dialer, identity(name))
                    for name, _, addr in self.specs
                }
            )
            given_up = self.supervise()
            if given_up:
                raise RuntimeError(
                    f"process(es) kept exiting during start-up: {', '.join(given_up)}"
                )
            line = "  ".join(f"{n}: {s.lower()}" for n, s in states.items())
            if progress and line != last:
                print(f"[up] {line}", file=sys.stderr, flush=True)
                last = line
            if all(s == "SERVING" for s in states.values()) and self._router_sees_nodes():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {line}")
            self.stop_event.wait(0.5)

    @property
    def routers(self) -> list[str]:
        """The gRPC address of every router this cluster runs (`router`, then the replicas)."""
        return [addr for name, _, addr in self.specs if is_router(name)]

    def _router_sees_nodes(self) -> bool:
        """Every router has polled every node healthy (a registry lags process health)."""
        return all(self._sees_nodes(router) for router in self.routers)

    def _sees_nodes(self, router: str) -> bool:
        import grpc

        from ruyiflow.cluster.api_keys import client_key, key_metadata
        from ruyiflow.cluster.topology_yaml import load_topology
        from ruyiflow.proto import ruyiflow_pb2 as pb
        from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc

        keys_env = load_topology(self.topology_path).router.api_keys_env
        metadata = key_metadata(client_key(None, keys_env))
        channel = grpc.insecure_channel(router)
        if self.dialer is not None:
            channel = self.dialer.channel(router, peer="router")
        with channel:
            try:
                reply = pb_grpc.RouterStub(channel).ListNodes(
                    pb.ListNodesRequest(), timeout=2, metadata=metadata
                )
            except grpc.RpcError:
                return False
        return all(n.healthy for n in reply.nodes)

    def stop(self, grace: float = 15.0) -> None:
        deadline = time.monotonic() + grace
        self.supervisor.stop(grace)
        self.engines.stop(grace=max(1.0, deadline - time.monotonic()))


def engine_state(engine: EngineProcess) -> str:
    """SERVING once an engine's /v1/models answers, else STARTING (or EXITED)."""
    if engine.is_answering(timeout=0.5):
        return "SERVING"
    return "STARTING" if engine.is_alive() else "EXITED"


def demo(router_address: str | list[str], api_key: str | None = None, tls=None) -> None:  # noqa: ANN001
    from ruyiflow.router.client import RouterClient, format_trace

    print(
        f"\n[up] demo: {len(DEMO_PROMPTS)} queries, an easy one and a hard one; each answer is "
        "followed by its route (difficulty score, then the node, tier and exit of each span)",
        flush=True,
    )
    with RouterClient(router_address, api_key=api_key, tls=tls) as client:
        for prompt in DEMO_PROMPTS:
            print(f"\n>>> {prompt}", flush=True)
            result = client.complete(prompt, max_tokens=48)
            print(result.text)
            print(format_trace(result.trace), flush=True)


def run(args: argparse.Namespace) -> int:
    if not Path(args.topology).is_file():
        print(f"ruyiflow up: topology file {args.topology} not found", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[up] %(message)s")
    stop = threading.Event()  # before anything: a signal at any moment stops everything
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Routers sign each chunk with this key, so a client resumes a stream on a router that
    # was restarted (or another of the cluster) when its router died (`router.resume`).
    os.environ.setdefault("RUYIFLOW_RESUME_KEY", secrets.token_hex(32))
    cluster = Cluster(args.topology, stop_event=stop)
    metrics = None
    try:
        if args.metrics:
            from ruyiflow.cluster.metrics_http import serve_registry

            metrics = serve_registry(args.metrics, cluster.supervisor.registry, "--metrics")
            print(f"[up] supervisor metrics on port {metrics.port}", file=sys.stderr, flush=True)
        cluster.start()
        cluster.wait_healthy(args.timeout)
        router = ",".join(cluster.routers)
        print(
            f"[up] all healthy; router at {router}. Query with: ruyiflow query --router {router} "
            '"your prompt"   (Ctrl-C stops everything)',
            file=sys.stderr,
            flush=True,
        )
        if args.demo:
            from ruyiflow.cluster.api_keys import client_key
            from ruyiflow.cluster.tls import tls_files
            from ruyiflow.cluster.topology_yaml import load_topology

            topology = load_topology(args.topology)
            key = client_key(None, topology.router.api_keys_env)
            demo(cluster.routers, key, tls_files(topology, "operator"))
            if args.exit_after_demo:
                return 0
        while not stop.wait(0.5):
            given_up = cluster.supervise()
            if given_up:
                print(f"[up] {', '.join(given_up)} kept exiting; stopping", file=sys.stderr)
                return 1
        return 0
    except Interrupted:
        return 0
    finally:
        print("[up] stopping", file=sys.stderr, flush=True)
        cluster.stop()
        if metrics is not None:
            metrics.stop()
