"""The `Router` gRPC service: Generate (score → plan → stream, with handoffs and failover),
Route (the same decision as a dry run) and ListNodes. `generate` is that one request path for
every front end: gRPC's Generate and the OpenAI HTTP API (`router.openai_app`) both call it.

Handlers translate and delegate: validation is `router.requests`, the decision `router.policy`,
the stream `router.session`. Domain exceptions become statuses in the interceptor
(`router.grpc_errors`); nothing here picks a status code.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator

import grpc

from ruyiflow.cluster.errors import InvalidRequest, NodeUnavailable, Overloaded
from ruyiflow.cluster.grpc_errors import UpstreamStatus
from ruyiflow.cluster.grpc_server import Admission
from ruyiflow.cluster.topology import Topology
from ruyiflow.cluster.wire import TIER
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.metrics import RouterMetrics
from ruyiflow.router.policy import Overrides, RoutePlan, pick_node, plan_route
from ruyiflow.router.registry import NodeRegistry
from ruyiflow.router.requests import overrides_of, score_request, validate_request
from ruyiflow.router.resume import StreamSigner, check_resume, resume_key
from ruyiflow.router.scorer import Scorer
from ruyiflow.router.session import RequestSession
from ruyiflow.router.trace import TraceBuilder
from ruyiflow.router.watchdog import IdleWatchdog

_CODE_OUTCOMES = {
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.FAILED_PRECONDITION: "invalid",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
}


def outcome_of(exc: BaseException) -> str:
    """Metric outcome label of a request that ended with `exc`."""
    if isinstance(exc, GeneratorExit):
        return "cancelled"  # the client went away between two chunks
    if isinstance(exc, InvalidRequest):
        return "invalid"
    if isinstance(exc, NodeUnavailable):
        return "unavailable"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, UpstreamStatus):
        return _CODE_OUTCOMES.get(exc.code, "error")
    return "error"


class _LoadGauge:
    """In-flight (streams open) and queued (not yet placed on a node) Generate calls."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self.num_in_flight = 0
        self.num_queued = 0

    def add(self, in_flight: int, queued: int) -> None:
        with self._lock:
            self.num_in_flight += in_flight
            self.num_queued += queued
            self._metrics.set_load(self.num_in_flight, self.num_queued)


class _Report:
    """One Generate call's bookkeeping: gauges while it runs, metrics once it ends. `finish`
    runs before the final chunk is sent (so a client that saw it sees the metrics too) and
    again on exit, where it does nothing."""

    def __init__(self, servicer: RouterServicer, api: str, trace: TraceBuilder | None) -> None:
        self._servicer = servicer
        self.api = api
        self.trace = trace or TraceBuilder(time.monotonic())
        self.plan: RoutePlan | None = None
        self._is_placed = self._is_finished = False
        servicer._load.add(1, 1)

    def placed(self) -> None:
        if not self._is_placed and not self._is_finished:
            self._is_placed = True
            self._servicer._load.add(0, -1)

    def finish(self, outcome: str) -> None:
        if self._is_finished:
            return
        self._is_finished = True
        self._servicer._load.add(-1, 0 if self._is_placed else -1)
        self._servicer._observe(self.plan, self.trace, outcome, self.api)


class RouterServicer(pb_grpc.RouterServicer):
    """Router service over a topology, a node registry, a scorer and metrics."""

    def __init__(
        self,
        topology: Topology,
        registry: NodeRegistry,
        scorer: Scorer,
        metrics: RouterMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self.topology = topology
        self.registry = registry
        self.scorer = scorer
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.admission = Admission("router")
        self._load = _LoadGauge(metrics)
        self.watchdog = IdleWatchdog(topology.router.stream_idle_timeout_s)
        self.resume_key = resume_key()
        metrics.set_cloud_share_target(getattr(topology.router, "target_cloud_share", None))

    def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        return self.generate(request, context)

    def generate(
        self,
        request: pb.GenerateRequest,
        context: grpc.ServicerContext,
        api: str = "grpc",
        trace: TraceBuilder | None = None,
    ) -> Iterator[pb.Chunk]:
        """Admit, score, plan, then stream with handoffs and failover; the final chunk carries
        the route trace. `api` labels the metrics; `trace` lets a caller read the difficulty
        as soon as the first chunk arrives (HTTP sends it as a header)."""
        report = None
        try:
            with self.admission.admit():
                report = _Report(self, api, trace)
                overrides, report.plan = self._decide(request, report.trace)  # score and plan
                signer = None
                if request.HasField("resume"):  # its router died: check what it had sent
                    signer = check_resume(self.resume_key, request)
                elif self.resume_key is not None:
                    signer = StreamSigner(self.resume_key, request)
                session = RequestSession(
                    self.topology,
                    self.registry,
                    self.metrics,
                    self.rng,
                    request,
                    request.request_id or uuid.uuid4().hex,
                    overrides.handoff_mode or self.topology.router.handoff.mode,
                    report.trace,
                    context,
                    on_placed=report.placed,
                    on_final=lambda: report.finish("ok"),
                    watchdog=self.watchdog,
                    signer=signer,
                )
                yield from session.run(report.plan)  # stream, hand off, fail over
                report.finish("cancelled" if session.is_cancelled else "ok")
        except BaseException as exc:
            if report is None:
                self.metrics.observe_rejected(outcome_of(exc), api=api)  # while draining
            else:
                report.finish(outcome_of(exc))
            raise

    def _decide(
        self, request: pb.GenerateRequest, trace: TraceBuilder | None = None
    ) -> tuple[Overrides, RoutePlan]:
        """Validate, score (into `trace`) and plan; InvalidRequest for bad input or overrides."""
        validate_request(request)
        overrides = overrides_of(request, self.topology)
        score = score_request(self.scorer, request)
        if trace is not None:
            trace.difficulty = score
            trace.is_scored = True
        # Token ids mean something only to the routed model's tokenizer: stay on that model.
        text = request.WhichOneof("prompt") != "token_ids"
        return overrides, plan_route(self.topology, score, overrides, across_models=text)

    def _observe(self, plan: RoutePlan | None, trace: TraceBuilder, outcome: str, api: str) -> None:
        first = trace.first_served() or (None if plan is None else (plan.tier, plan.exit))
        if first is None:
            score = trace.difficulty if trace.is_scored else None
            self.metrics.observe_rejected(outcome, score, api=api)
            return
        total_s = time.monotonic() - trace.started
        self.metrics.observe_request(
            first[0],
            first[1],
            outcome,
            score=trace.difficulty,
            ttft_s=trace.ttft_s(),
            total_s=total_s if outcome == "ok" else None,
            api=api,
        )

    def Route(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> pb.RouteReply:
        trace = TraceBuilder(time.monotonic())
        _, plan = self._decide(request, trace)
        try:
            node = pick_node(self.registry.loads(plan.candidates), self.rng).name
        except NodeUnavailable:
            raise NodeUnavailable(f"no healthy node serves exit {plan.exit}") from None
        return pb.RouteReply(
            difficulty=trace.difficulty,
            tier=TIER.value(plan.tier),
            exit=plan.exit,
            node=node,
            node_address=self.registry.spec(node).listen,
        )

    def ListNodes(  # noqa: N802
        self, request: pb.ListNodesRequest, context: grpc.ServicerContext
    ) -> pb.ListNodesReply:
        return pb.ListNodesReply(nodes=self.registry.statuses())

    def begin_drain(self) -> int:
        """Refuse new Generate calls (UNAVAILABLE); returns how many are in flight."""
        return self.admission.begin_drain()

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait for in-flight Generate calls to finish; False if `timeout` passed first."""
        return self.admission.wait_idle(timeout)
