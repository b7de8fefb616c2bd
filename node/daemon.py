"""A node daemon's life: listen (health NOT_SERVING, metrics up) -> load the model -> warm up and
measure prefill speed -> SERVING -> on SIGTERM drain (refuse new streams, finish in-flight ones
within the grace period) -> stop. The edge and cloud daemons call `run_node` with their tier."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from ruyiflow.cluster.access import AccessInterceptor, node_security
from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.grpc_server import serve_grpc, service_name
from ruyiflow.cluster.metrics_http import serve_registry
from ruyiflow.cluster.tls import server_credentials, tls_files
from ruyiflow.cluster.topology import NodeSpec, Topology, onnx_dir_for
from ruyiflow.cluster.units import format_address, parse_address
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.runner import open_runner
from ruyiflow.node.backend import BackendFacts, OpenedBackend
from ruyiflow.node.gate import open_gate
from ruyiflow.node.metrics import NodeMetrics
from ruyiflow.node.servicer import NodeIdentity, NodeServicer
from ruyiflow.node.threads import engine_threads
from ruyiflow.node.worker import EngineWorker
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc

log = logging.getLogger("ruyiflow.node")
WARMUP_TOKENS = 128
BIND_HOST_ENV = "RUYIFLOW_BIND_HOST"
BackendOpener = Callable[[Topology, NodeSpec], OpenedBackend]


def bind_address(address: str) -> str:
    """Where a daemon listens for its topology `address`: the address itself, or its port on
    $RUYIFLOW_BIND_HOST when set (a Kubernetes pod binds 0.0.0.0 while the topology names it
    by the DNS name the router dials)."""
    host = os.environ.get(BIND_HOST_ENV)
    return format_address(host, parse_address(address)[1]) if host else address


def open_engine(topology: Topology, spec: NodeSpec) -> Engine:
    """The node's engine over the model runner its backend names."""
    model_spec = topology.model(spec.model)
    threads = engine_threads(topology, spec)
    log.info("%s: engine on %d CPU thread(s)", spec.name, threads)
    if spec.backend == "onnxruntime":  # torch-free: ONNX exports of each served exit
        args: tuple = (onnx_dir_for(topology, spec), spec.exits, spec.providers, model_spec.path)
        runner = open_runner("onnxruntime", *args, threads=threads)
    else:
        import torch

        torch.set_num_threads(threads)
        runner = open_runner(
            "torch",
            model_spec.path,
            model_spec.dtype,
            extra_exits=model_spec.extra_exits or None,
            max_context=spec.max_context,
            max_batch=spec.max_batch,
            overlay=model_spec.overlay_arg,
            device=spec.device,
        )
        missing = [e for e in spec.exits if e not in runner.config.exits]
        if missing:
            raise TopologyError(
                f"node {spec.name!r} serves exits {missing} that model {spec.model!r} lacks "
                f"(exits {list(runner.config.exits)})"
            )
    return Engine(runner, max_batch=spec.max_batch, max_context=spec.max_context)


def open_engine_backend(topology: Topology, spec: NodeSpec) -> OpenedBackend:
    """Our engine (torch / onnxruntime) on its own thread, warmed up and measured."""
    if spec.backend == "openai":
        raise TopologyError(f"node {spec.name!r} has backend openai: run it with `ruyiflow cloud`")
    engine = open_engine(topology, spec)
    # refuses a calibration (or probe) made for other weights before serving anything
    gate = open_gate(topology, spec, engine.fingerprint, tuple(engine.config.exits))
    prefill = engine.measure_prefill(max(spec.exits), WARMUP_TOKENS)
    worker = EngineWorker(engine, tuple(spec.exits), gate)
    worker.start()
    return OpenedBackend(
        worker,
        engine.tokenizer,
        BackendFacts.of_engine(engine),
        engine.fingerprint,
        prefill,
        engine.max_state_bytes(spec.max_context),
    )


def run_node(
    topology: Topology,
    name: str,
    tier: str,
    stop: threading.Event | None = None,
    open_backend: BackendOpener = open_engine_backend,
) -> int:
    """Serve node `name` until SIGTERM/SIGINT (or `stop` is set); returns an exit code.
    `open_backend` starts what generates tokens (the cloud daemon adds external engines)."""
    try:
        spec = topology.node(name)
    except KeyError:
        raise TopologyError(f"no node named {name!r} in {topology.source}") from None
    if spec.tier != tier:
        raise TopologyError(
            f"node {name!r} is a {spec.tier} node; start it with `ruyiflow {spec.tier}`"
        )
    model_spec = topology.model(spec.model)
    stop = stop or threading.Event()
    is_loading = [True]

    def on_signal(*_: object) -> None:
        if is_loading[0]:  # nothing admitted yet, nothing to drain: leave now, not after the load
            os._exit(0)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        if threading.current_thread() is threading.main_thread():
            signal.signal(sig, on_signal)

    metrics = NodeMetrics(name, tier)
    tls = tls_files(topology, name)  # mTLS: callers must show a certificate of the cluster CA
    metrics_server = serve_registry(
        bind_address(spec.metrics), metrics.registry, f"nodes.{name}.metrics", tls, True
    )
    identity = NodeIdentity(
        name,
        tier,
        spec.model,
        spec.backend,
        spec.max_batch,
        spec.max_context,
        tuple(spec.exits),
        spec.max_streams,
        spec.max_queued_tokens or None,
    )
    access, dialer, peers = node_security(topology, name)
    servicer = NodeServicer(identity, metrics, access, peers, dialer)
    served = serve_grpc(
        [(pb_grpc.add_NodeServicer_to_server, servicer)],
        bind_address(spec.listen),
        [service_name("Node")],
        interceptors=[AccessInterceptor(access)],
        field=f"nodes.{name}.listen",
        credentials=None if tls is None else server_credentials(tls, require_client_cert=True),
    )
    log.info("%s: listening on %s, loading model %s", name, spec.listen, model_spec.path)
    opened = open_backend(topology, spec)
    metrics.watch_load(opened.backend.load)
    servicer.attach(
        opened.backend,
        opened.fingerprint,
        opened.prefill_tokens_per_s,
        opened.max_state_bytes,
        opened.facts,
        opened.tokenizer,
    )
    is_loading[0] = False

    def follow(is_up: bool) -> None:  # an external engine's health is the node's
        is_serving = is_up and not servicer.admission.is_draining
        served.set_serving(is_serving)
        metrics.ready.labels(**metrics.lab()).set(int(is_serving))

    if opened.health is None:
        follow(True)
    else:
        opened.health.watch(follow)
    log.info(
        "%s: serving exits %s (prefill %.0f tok/s, fingerprint %s)",
        name,
        list(spec.exits),
        opened.prefill_tokens_per_s,
        opened.fingerprint,
    )
    while not stop.wait(0.5):
        pass
    grace = topology.router.grace_period_s
    in_flight = servicer.admission.begin_drain()
    served.set_serving(False)
    metrics.ready.labels(**metrics.lab()).set(0)
    log.info("%s: draining %d stream(s), grace %.0fs", name, in_flight, grace)
    servicer.admission.wait_idle(grace)
    served.stop(grace=1.0)
    opened.backend.stop()
    metrics_server.stop()
    return 0
