"""Node gRPC servicer: protobuf <-> engine objects, nothing else. Domain exceptions raised here
become status codes in the shared interceptor (router/grpc_errors.py).

Story of a request: admit (not draining, prompt -> ids, exit served) -> the engine thread steps
it -> each token becomes a Chunk -> the stream ends with a finish reason, or with a HANDOFF chunk
naming the parked state the router will move.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from ruyiflow.cluster.access import LOCAL, AccessPolicy, Caller, Dialer
from ruyiflow.cluster.errors import PermissionDenied
from ruyiflow.cluster.grpc_server import Admission, channel_options
from ruyiflow.cluster.wire import HANDOFF_MODE, TIER
from ruyiflow.engine.errors import InvalidRequest, NodeUnavailable
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.engine.tokenizer import Tokenizer
from ruyiflow.node.accepted import AcceptedStates
from ruyiflow.node.backend import BackendFacts, Finished, NodeBackend
from ruyiflow.node.framing import STATE_MODES, header_for, read_state, state_parts
from ruyiflow.node.gate import GateCheck
from ruyiflow.node.metrics import NodeMetrics
from ruyiflow.node.wire import (
    escalation_from_proto,
    finish_reason,
    gate_check_proto,
    handoff_chunk,
    request_prompt_ids,
    sampling_from_proto,
    token_chunk,
)
from ruyiflow.node.worker import LocalSwitch, Parked, RequestHandle
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc

MIN_ACCEPTED_STATES = 4


@dataclass(frozen=True)
class NodeIdentity:
    name: str
    tier: str
    model: str
    backend: str
    max_batch: int
    max_context: int
    exits: tuple[int, ...]
    max_streams: int | None = None  # Generate/Resume streams at once (None: no limit)
    # Prompt + max_tokens summed over those streams (None: no limit); `max_queued_tokens`.
    max_tokens: int | None = None


class NodeServicer(pb_grpc.NodeServicer):
    """Serves from the moment the port opens; answers UNAVAILABLE until `attach` (model loaded).
    `access` authenticates callers (None: everyone is this machine's operator); `peers` maps
    the topology's node addresses to names (the only places PushState sends to); `dialer`
    opens those channels as this node."""

    def __init__(
        self,
        identity: NodeIdentity,
        metrics: NodeMetrics,
        access: AccessPolicy | None = None,
        peers: dict[str, str] | None = None,
        dialer: Dialer | None = None,
    ):
        self.id = identity
        self.metrics = metrics
        self.access = access
        self.peers = dict(peers or {})
        self.dialer = dialer or Dialer(identity.name)
        self.worker: NodeBackend | None = None
        self.admission = Admission(
            f"node {identity.name}", identity.max_streams, identity.max_tokens
        )
        self.accepted: AcceptedStates | None = None

    def attach(
        self,
        worker: NodeBackend,
        fingerprint: str,
        prefill_tokens_per_s: float,
        max_state_bytes: int,
        facts: BackendFacts | Callable[[], BackendFacts] | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        """`worker`: our engine thread (facts and tokenizer read from its engine) or another
        backend (`node.backend`), which passes both (facts as a callable when they are learnt
        while serving, as an external engine's are)."""
        self.tokenizer = tokenizer or worker.engine.tokenizer
        self.facts = facts or BackendFacts.of_engine(worker.engine)
        self.fingerprint = fingerprint
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.max_state_bytes = max_state_bytes
        # Pushed states wait here for their Resume, usually for milliseconds: room for one
        # state per batch slot, and twice the largest state in bytes.
        self.accepted = AcceptedStates(
            max(MIN_ACCEPTED_STATES, self.id.max_batch), 2 * max_state_bytes
        )
        self.accepted.start_sweeper(also=getattr(worker, "sweep_parked", None))
        self.worker = worker  # last: its presence means ready

    # -- Generate / Resume --------------------------------------------------------------------
    def Generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        self._check_ready()
        with self.admission.admit():
            yield from self._generate(request, context)

    def _generate(
        self, request: pb.GenerateRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        if (request.prefix_token_ids or request.prefix_text) and not self._caller(
            context
        ).is_router:
            raise PermissionDenied("prefix_text and prefix_token_ids are for the router only")
        prompt_ids = request_prompt_ids(request, self.tokenizer, self.id.max_context)
        exit_layer = (
            request.overrides.exit if request.overrides.HasField("exit") else self.id.exits[-1]
        )
        prefix = list(request.prefix_token_ids)
        params = sampling_from_proto(request.sampling)
        if request.prefix_text:
            # Text another model generated (a move across tokenizers): encode it with ours; the
            # router's max_tokens counts only what is left, so the prefix is added to it.
            if prefix:
                raise InvalidRequest("set prefix_token_ids or prefix_text, not both")
            prefix = self.tokenizer.encode(request.prefix_text)
            params = dataclasses.replace(params, max_tokens=params.max_tokens + len(prefix))
        # The KV this stream may fill: its prompt and max_tokens (which counts the prefix).
        with self.admission.hold_tokens(len(prompt_ids) + max(len(prefix), params.max_tokens)):
            handle = self.worker.generate(
                request.request_id,
                prompt_ids,
                params,
                exit_layer,
                escalation_from_proto(request.escalation),
                prefix,
            )
            yield from self._stream(handle, context, len(prefix), exit_layer, len(prompt_ids))

    def Resume(self, request_iterator, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        self._check_ready()
        with self.admission.admit():
            yield from self._resume(request_iterator, context)

    def _resume(self, request_iterator, context: grpc.ServicerContext) -> Iterator[pb.Chunk]:
        header, data = read_state(request_iterator, self.max_state_bytes)
        if header.transfer_id:
            header, data = self._take_accepted(header)
        self.metrics.handoff_bytes.labels(**self.metrics.lab(direction="in")).observe(len(data))
        num_prompt = len(header.prompt_token_ids)
        offset = len(header.generated_token_ids)
        sampling = header.request.sampling  # its max_tokens counts the `offset` generated
        max_tokens = (
            sampling.max_tokens if sampling.HasField("max_tokens") else SamplingParams.max_tokens
        )
        with self.admission.hold_tokens(num_prompt + max(offset, max_tokens)):
            handle = self.worker.resume(
                header.request_id,
                data,
                header.to_exit,
                escalation_from_proto(header.request.escalation),
            )
            yield from self._stream(handle, context, offset, header.to_exit, num_prompt)

    def _stream(
        self,
        handle: RequestHandle,
        context: grpc.ServicerContext,
        offset: int,
        exit_layer: int,
        num_prompt_tokens: int,
    ) -> Iterator[pb.Chunk]:
        """Chunks of one request; the first carries `num_prompt_tokens` (the client's usage)."""
        m, started, last, outcome = self.metrics, time.perf_counter(), None, "error"
        ended, is_first = False, True
        gate: list[pb.GateCheck] = []  # the gate's looks, sent on the next chunk
        m.in_flight.labels(**m.lab()).inc()
        try:
            while True:
                try:
                    item = handle.get(timeout=0.25)
                except Exception:  # queue.Empty: check the client is still there
                    if not context.is_active():
                        outcome = "cancelled"
                        return
                    continue
                if item is None:
                    ended = True
                    return
                if isinstance(item, Exception):
                    ended = True
                    raise item
                if isinstance(item, GateCheck):
                    gate.append(gate_check_proto(item))
                    continue
                if isinstance(item, Finished):  # the end, after the last token
                    outcome = item.reason
                    chunk = pb.Chunk(
                        request_id=handle.request_id,
                        source=self._source(exit_layer),
                        token_offset=offset,
                        finish_reason=finish_reason(item.reason),
                    )
                    chunk.num_prompt_tokens = num_prompt_tokens if is_first else 0
                    is_first = False
                    yield chunk
                    continue
                if isinstance(item, LocalSwitch):
                    m.escalations.labels(**m.lab(kind="local", reason=item.reason)).inc()
                    exit_layer = item.to_exit
                    continue
                if isinstance(item, Parked):
                    m.escalations.labels(**m.lab(kind="handoff", reason=item.reason)).inc()
                    m.handoff_bytes.labels(**m.lab(direction="out")).observe(item.state_bytes)
                    outcome = "handoff"
                    chunk = handoff_chunk(
                        handle.request_id, item, offset, self._source(exit_layer), self.fingerprint
                    )
                    chunk.gate.extend(gate)
                    gate.clear()
                    chunk.num_prompt_tokens = num_prompt_tokens if is_first else 0
                    is_first = False
                    yield chunk
                    continue
                now = time.perf_counter()
                (m.ttft if last is None else m.itl).labels(**m.lab()).observe(
                    now - (last or started)
                )
                last = now
                m.tokens.labels(**m.lab(exit=str(item.exit))).inc()
                chunk = token_chunk(handle.request_id, item, offset, self._source(item.exit))
                chunk.gate.extend(gate)
                gate.clear()
                chunk.num_prompt_tokens = num_prompt_tokens if is_first else 0
                is_first = False
                yield chunk
                offset += 1
                if item.finished:
                    outcome = item.finish_reason
        finally:
            if not ended:  # client went away (or the stream was closed): stop generating
                self.worker.cancel(handle)
            m.in_flight.labels(**m.lab()).dec()
            m.e2e.labels(**m.lab()).observe(time.perf_counter() - started)
            m.requests.labels(**m.lab(exit=str(exit_layer), outcome=outcome)).inc()

    def _source(self, exit_layer: int) -> pb.Source:
        return pb.Source(node=self.id.name, tier=TIER.value(self.id.tier), exit=exit_layer)

    # -- moving states ----------------------------------------------------------------------------
    def AcceptState(self, request_iterator, context: grpc.ServicerContext) -> pb.AcceptStateReply:
        self._check_ready()
        reserved: list[str] = []

        def reserve(header: pb.HandoffHeader) -> None:
            sender = self._caller(context).name
            self.accepted.reserve(header.transfer_id, header.total_bytes, sender)
            reserved.append(header.transfer_id)

        try:
            header, data = read_state(
                request_iterator, self.max_state_bytes, pushed=True, on_header=reserve
            )
        except BaseException:
            for transfer_id in reserved:
                self.accepted.release(transfer_id)
            raise
        self.accepted.fill(header.transfer_id, header, data)
        return pb.AcceptStateReply(transfer_id=header.transfer_id, num_bytes=len(data))

    def _take_accepted(self, resume: pb.HandoffHeader) -> tuple[pb.HandoffHeader, bytes]:
        header, data = self.accepted.take(resume.transfer_id)
        if resume.request_id and header.request_id and resume.request_id != header.request_id:
            raise InvalidRequest("transfer belongs to another request")
        stored = pb.HandoffHeader()
        stored.CopyFrom(header)
        stored.to_exit = resume.to_exit
        if resume.HasField("request"):
            stored.request.CopyFrom(resume.request)
        return stored, data

    def _export(self, ref: pb.StateRef) -> bytes:
        self._check_ready()
        if ref.mode not in STATE_MODES:
            raise InvalidRequest("state mode must be HIDDEN or TOKENS")
        return self.worker.take_parked(ref.state_handle, HANDOFF_MODE.name(ref.mode))

    def FetchState(
        self, request: pb.StateRef, context: grpc.ServicerContext
    ) -> Iterator[pb.ResumeRequest]:
        data = self._export(request)
        yield from state_parts(header_for(data, "", request.to_exit), data)

    def PushState(
        self, request: pb.PushStateRequest, context: grpc.ServicerContext
    ) -> pb.PushStateReply:
        peer = self.peers.get(request.destination)
        if peer is None or peer == self.id.name:
            raise PermissionDenied(
                f"push destination {request.destination[:100]!r} is not another node of the "
                "topology"
            )
        data = self._export(request.state)
        header = header_for(data, "", request.state.to_exit, transfer_id=request.transfer_id)
        started = time.perf_counter()
        with self.dialer.channel(request.destination, channel_options(), peer=peer) as channel:
            stub = pb_grpc.NodeStub(channel)
            try:
                stub.AcceptState(state_parts(header, data), timeout=60)
            except grpc.RpcError as exc:
                raise NodeUnavailable(
                    f"push to {request.destination} failed: {exc.details()}"
                ) from exc
        return pb.PushStateReply(
            num_bytes=len(data), duration_ms=(time.perf_counter() - started) * 1e3
        )

    # -- facts and control ------------------------------------------------------------------------
    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        self._check_ready()
        running, queued, outstanding = self.worker.load()
        c = self.facts() if callable(self.facts) else self.facts
        prefill = self.prefill_tokens_per_s
        if c.prefill_tokens_per_s is not None:
            prefill = c.prefill_tokens_per_s
        return pb.NodeInfo(
            name=self.id.name,
            tier=TIER.value(self.id.tier),
            model=self.id.model,
            model_fingerprint=self.fingerprint,
            family=c.family,
            exits=list(self.id.exits),
            capacity=pb.Capacity(max_batch=self.id.max_batch, max_context=self.id.max_context),
            load=pb.Load(running=running, queued=queued, outstanding_tokens=outstanding),
            shape=pb.ModelShape(
                num_layers=c.num_layers,
                hidden_size=c.hidden_size,
                num_kv_heads=c.num_kv_heads,
                head_dim=c.head_dim,
                dtype_bytes=c.dtype_bytes,
            ),
            prefill_tokens_per_s=prefill,
            backend=self.id.backend,
            draining=self.admission.is_draining,
            confidence=c.confidence,
        )

    def Drain(self, request: pb.DrainRequest, context: grpc.ServicerContext) -> pb.DrainReply:
        """An operator's drain (or its undo); a node that is stopping stays draining."""
        if request.undo:
            if not self.admission.end_drain():
                raise NodeUnavailable(f"node {self.id.name} is stopping; it cannot be undrained")
            return pb.DrainReply(num_in_flight=self.admission.num_in_flight)
        return pb.DrainReply(num_in_flight=self.admission.begin_drain(final=False))

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        if self.access is None:
            return Caller(LOCAL, "loopback")
        return self.access.caller(context)

    def _check_ready(self) -> None:
        if self.worker is None:
            raise NodeUnavailable(f"node {self.id.name} is still loading its model")
