"""A node daemon's life: listen (health NOT_SERVING, metrics up) -> load the model -> warm up and
measure prefill speed -> SERVING -> on SIGTERM drain (refuse new streams, finish in-flight ones
within the grace period) -> stop. The edge and cloud daemons call `run_node` with their tier."""

from __future__ import annotations

import logging
import signal
import threading
import time

from engine.checkpoint import load_model
from engine.engine import Engine
from engine.model import Work
from engine.serving.metrics import NodeMetrics
from engine.serving.servicer import NodeIdentity, NodeServicer
from engine.serving.worker import EngineWorker
from proto import ruyiflow_pb2_grpc as pb_grpc
from router.errors import TopologyError
from router.grpc_server import serve_grpc, service_name
from router.topology import Topology

log = logging.getLogger("ruyiflow.node")
WARMUP_TOKENS = 128


def measure_prefill(engine: Engine, exit_layer: int, num_tokens: int = WARMUP_TOKENS) -> float:
    """Prefill tokens/s at `exit_layer` (also warms the allocator and kernels up)."""
    model = engine.model
    ids = [(37 * i) % (engine.config.vocab_size - 1) + 1 for i in range(num_tokens)]
    best = float("inf")
    for _ in range(3):  # the first run pays for allocation; keep the best of the rest
        started = time.perf_counter()
        model.forward([Work(model.new_cache(), ids, 0, exit_layer)])
        best = min(best, time.perf_counter() - started)
    return num_tokens / best


def max_state_bytes(engine: Engine, max_context: int) -> int:
    """Largest valid handoff state: boundary + every trunk layer's KV for max_context tokens."""
    c = engine.config
    elem = engine.model.embed.element_size()
    per_token = c.hidden_size + 2 * (c.num_layers - 1) * c.num_kv_heads * c.head_dim
    return per_token * max_context * elem + (1 << 20)


def run_node(topology: Topology, name: str, tier: str, stop: threading.Event | None = None) -> int:
    """Serve node `name` until SIGTERM/SIGINT (or `stop` is set); returns an exit code."""
    try:
        spec = topology.node(name)
    except KeyError:
        raise TopologyError(f"no node named {name!r} in {topology.source}") from None
    if spec.tier != tier:
        raise TopologyError(
            f"node {name!r} is a {spec.tier} node; start it with `ruyiflow {spec.tier}`"
        )
    if spec.backend != "torch":
        raise TopologyError(
            f"node {name!r}: backend {spec.backend!r} is not available in this build"
        )
    model_spec = topology.model(spec.model)
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if threading.current_thread() is threading.main_thread():
            signal.signal(sig, lambda *_: stop.set())

    from router.metrics import serve_registry

    metrics = NodeMetrics(name, tier)
    metrics_server = serve_registry(spec.metrics, metrics.registry)
    identity = NodeIdentity(
        name, tier, spec.model, spec.backend, spec.max_batch, spec.max_context, tuple(spec.exits)
    )
    servicer = NodeServicer(identity, metrics)
    served = serve_grpc(
        [(pb_grpc.add_NodeServicer_to_server, servicer)], spec.listen, [service_name("Node")]
    )
    log.info("%s: listening on %s, loading model %s", name, spec.listen, model_spec.path)
    loaded = load_model(
        model_spec.path,
        model_spec.dtype,
        model_spec.extra_exits or None,
        max_context=spec.max_context,
        max_batch=spec.max_batch,
    )
    missing = [e for e in spec.exits if e not in loaded.config.exits]
    if missing:
        raise TopologyError(
            f"node {name!r} serves exits {missing} that model {spec.model!r} lacks "
            f"(exits {list(loaded.config.exits)})"
        )
    engine = Engine(loaded, max_batch=spec.max_batch, max_context=spec.max_context)
    prefill = measure_prefill(engine, max(spec.exits))
    worker = EngineWorker(engine, tuple(spec.exits))
    worker.start()
    servicer.attach(worker, loaded.fingerprint, prefill, max_state_bytes(engine, spec.max_context))
    served.set_serving(True)
    metrics.ready.labels(**metrics.lab()).set(1)
    log.info(
        "%s: serving exits %s (prefill %.0f tok/s, fingerprint %s)",
        name,
        list(spec.exits),
        prefill,
        loaded.fingerprint,
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
    worker.stop()
    metrics_server.stop()
    return 0
