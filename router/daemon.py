"""The router daemon: topology → registry + scorer + metrics + servicer, served over gRPC (health,
reflection, error interceptor), the OpenAI-compatible HTTP API (`router.http`, same servicer) and
`/metrics`, drained on SIGTERM/SIGINT.

`ruyiflow router --topology FILE` calls `main(namespace)`; `run_router(...)` is the same without
argument parsing; `RouterDaemon` is the start/stop handle tests and `ruyiflow up` can hold.
Health turns SERVING as soon as the server is up: nodes may come later, and until one serving the
chosen exit is healthy, Generate answers UNAVAILABLE saying so.
"""

from __future__ import annotations

import argparse
import logging
import random
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ruyiflow.cluster.access import ROUTER
from ruyiflow.cluster.api_keys import ApiKeys, api_key_guard
from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.grpc_server import (
    DEFAULT_MAX_WORKERS,
    GrpcServer,
    drain_and_stop,
    serve_grpc,
    service_name,
)
from ruyiflow.cluster.tls import server_credentials, tls_files
from ruyiflow.cluster.topology import Topology
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.metrics import MetricsServer, RouterMetrics
from ruyiflow.router.registry import DEFAULT_POLL_INTERVAL_S, NodeRegistry
from ruyiflow.router.scorers import make_scorer
from ruyiflow.router.service import RouterServicer

if TYPE_CHECKING:
    from ruyiflow.router.openai_server import HttpServer

log = logging.getLogger(__name__)

STOP_GRACE_S = 1.0  # after draining, calls still open get this long before being cancelled


class RouterDaemon:
    """A running router. `listen`/`metrics_address`/`http_address` override the topology's
    (port 0: any; an empty `http_address` serves no OpenAI API); `serve_metrics=False` skips
    the metrics server (the registry is still filled)."""

    def __init__(
        self,
        topology: Topology,
        *,
        listen: str | None = None,
        metrics_address: str | None = None,
        http_address: str | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        rng: random.Random | None = None,
        serve_metrics: bool = True,
    ) -> None:
        self.topology = topology
        exits = sorted({e for node in topology.nodes for e in node.exits})
        self.metrics = RouterMetrics(tuple(n.name for n in topology.nodes), tuple(exits))
        self.registry = NodeRegistry(topology, self.metrics, poll_interval_s)
        spec = topology.router.scorer
        self.servicer = RouterServicer(
            topology, self.registry, make_scorer(spec.name, spec.path), self.metrics, rng
        )
        self._listen = listen or topology.router.listen
        self._metrics_address = metrics_address or topology.router.metrics
        self._http_address = topology.router.http if http_address is None else http_address
        self._serve_metrics = serve_metrics
        self.api_keys = ApiKeys.from_env(topology.router.api_keys_env)
        self.tls = tls_files(topology, ROUTER)
        self._require_client_cert = topology.tls is not None and topology.tls.require_client_cert
        self.server: GrpcServer | None = None
        self.metrics_server: MetricsServer | None = None
        self.http_server: HttpServer | None = None
        self._http_executor: ThreadPoolExecutor | None = None
        self._is_stopped = False

    def start(self) -> RouterDaemon:
        adders = [(pb_grpc.add_RouterServicer_to_server, self.servicer)]
        guards = [api_key_guard(self.api_keys)] if self.api_keys is not None else []
        credentials = None
        if self.tls is not None:
            credentials = server_credentials(self.tls, self._require_client_cert)
        self.server = serve_grpc(
            adders,
            self._listen,
            [service_name("Router")],
            interceptors=guards,
            field="router.listen",
            credentials=credentials,
        )
        self.registry.start()
        try:
            if self._serve_metrics:
                self.metrics_server = self.metrics.serve(
                    self._metrics_address, self.tls, self._require_client_cert
                )
            if self._http_address:
                self.http_server = self._serve_http(self._http_address)
        except OSError:
            self.server.stop(0)
            if self.metrics_server is not None:
                self.metrics_server.stop()
            self.registry.close()
            raise
        self.server.set_serving(True)
        metrics_port = self.metrics_server.port if self.metrics_server else None
        http_port = self.http_server.port if self.http_server else None
        log.info(
            "router serving on port %d, OpenAI API on port %s, metrics on port %s, %d nodes",
            self.port,
            http_port,
            metrics_port,
            len(self.topology.nodes),
        )
        return self

    def _serve_http(self, address: str) -> HttpServer:
        # Imported here: a router without `router.http` never loads the ASGI stack.
        from ruyiflow.router.openai_app import build_app
        from ruyiflow.router.openai_server import HttpServer

        # One thread per open request, as the gRPC server holds one per open stream.
        self._http_executor = ThreadPoolExecutor(DEFAULT_MAX_WORKERS, thread_name_prefix="openai")
        app = build_app(self.servicer, self._http_executor, self.api_keys)
        return HttpServer(
            app,
            address,
            grace_s=STOP_GRACE_S,
            tls=self.tls,
            require_client_cert=self._require_client_cert,
        ).start()

    @property
    def port(self) -> int:
        assert self.server is not None, "start() first"
        return self.server.port

    @property
    def http_port(self) -> int:
        assert self.http_server is not None, "start() with an http address first"
        return self.http_server.port

    @property
    def metrics_port(self) -> int:
        assert self.metrics_server is not None, "start() first"
        return self.metrics_server.port

    def stop(self, grace: float | None = None) -> bool:
        """Drain: health NOT_SERVING, new Generate calls UNAVAILABLE, in-flight ones get up to
        `grace` seconds (default: the topology's grace period). True if all finished."""
        if self._is_stopped:
            return True
        self._is_stopped = True
        grace = self.topology.router.grace_period_s if grace is None else grace
        is_idle = True
        if self.server is not None:
            num_in_flight = self.servicer.admission.num_in_flight
            log.info("draining %d request(s), grace %.1f s", num_in_flight, grace)
            is_idle = drain_and_stop(self.server, self.servicer.admission, grace, STOP_GRACE_S)
        if self.http_server is not None:
            self.http_server.stop()  # after the drain: HTTP requests were counted in it too
        if self._http_executor is not None:
            self._http_executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self.registry.close()
        log.info("router stopped%s", "" if is_idle else " (grace period ran out)")
        return is_idle


def run_router(
    topology: str | Path | Topology,
    ready_event: threading.Event | None = None,
    stop_event: threading.Event | None = None,
    **addresses: str | None,
) -> None:
    """Run until SIGTERM/SIGINT (main thread only) or `stop_event`, then drain and stop;
    `ready_event` is set once the router serves. `addresses` (listen, metrics_address,
    http_address) override the topology's: a second router of the same cluster."""
    if not isinstance(topology, Topology):
        topology = Topology.load(topology)
    stop = stop_event or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    daemon = RouterDaemon(topology, **addresses).start()
    if ready_event is not None:
        ready_event.set()
    # Wake every 0.5 s, as the node and `up` do: a SIGTERM the kernel hands to one of gRPC's
    # threads only flags the Python handler, which runs when the main thread next runs bytecode;
    # a bare wait() never returned then (seen under load: no "draining" line, 30 s, killed).
    while not stop.wait(0.5):
        pass
    daemon.stop()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `ruyiflow router` options, for the CLI to put on its subcommand."""
    parser.add_argument("--topology", default="topology.yaml", help="topology file")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    # Another router of the same cluster (clients list both; they share $RUYIFLOW_RESUME_KEY).
    parser.add_argument("--listen", default=None, help="gRPC address instead of router.listen")
    parser.add_argument("--metrics", default=None, help="instead of router.metrics")
    parser.add_argument("--http", default=None, help="instead of router.http ('' turns it off)")
    return parser


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point of `ruyiflow router`: a parsed namespace (needs `topology`; `log_level` is
    optional) or an argv list. Returns the exit status."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="ruyiflow router", description=__doc__)
        args = add_arguments(parser).parse_args(args)
    level = str(getattr(args, "log_level", "INFO") or "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        topology = Topology.load(getattr(args, "topology", None) or "topology.yaml")
    except TopologyError as exc:
        print(f"ruyiflow router: {exc}", file=sys.stderr)
        return 2
    addresses = {
        "listen": getattr(args, "listen", None),
        "metrics_address": getattr(args, "metrics", None),
        "http_address": getattr(args, "http", None),
    }
    try:
        run_router(topology, **addresses)
    except OSError as exc:  # e.g. the listen or metrics port is taken
        print(f"ruyiflow router: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def run(args: argparse.Namespace) -> int:
    """`ruyiflow router` (the CLI's entry point for this module)."""
    return main(args)
