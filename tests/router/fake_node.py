"""A scripted `Node` service for router tests: no model, deterministic tokens, real gRPC.

Token `k` of every request (0-based, across handoffs and failovers) is the id `100 + k`, so a
client can check that nothing was lost or repeated just by comparing with `range`. The node
honours `escalation.force_after_tokens` / `force_to_exit` the way real nodes do: a branch switch
on the same stream when it serves the target exit, else a HANDOFF chunk with a state handle.
States move by PushState → AcceptState (a real node-to-node call) or FetchState, as a small
opaque payload. `Behaviour` scripts failures (abort mid-stream, refuse pushes, errors, delays).
"""

from __future__ import annotations

import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from ruyiflow.cluster.grpc_server import GrpcServer, serve_grpc, service_name
from ruyiflow.cluster.wire import TIER
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc

FINGERPRINT = "fp-smollm2-test"
MODEL_EXITS = (12, 16, 20, 24, 29)
PROMPT_IDS = (1, 2, 3, 4)
HIDDEN_PAYLOAD = bytes(range(256)) * 16  # 4 KiB stands in for boundary hidden states + KV
SHAPE = pb.ModelShape(num_layers=30, hidden_size=576, num_kv_heads=3, head_dim=64, dtype_bytes=4)


def token_id(offset: int) -> int:
    return 100 + offset


@dataclass
class Behaviour:
    """What the node does wrong (defaults: nothing) and how it sounds."""

    max_prob: float = 0.9
    token_delay_s: float = 0.0
    die_after: int | None = None  # abort UNAVAILABLE after this many tokens on one stream
    num_deaths: int = 1  # how many streams die that way
    hang_after: int | None = None  # go silent (a hung node) after this many tokens, once,
    hang_s: float = float("inf")  # for this long (or until the caller gives up)
    error: tuple[grpc.StatusCode, str] | None = None  # Generate fails with this at once
    resume_error: tuple[grpc.StatusCode, str] | None = None
    fail_push: bool = False
    fail_fetch: grpc.StatusCode | None = None  # FetchState fails with this code
    end_without_finish: bool = False


class FakeNode(pb_grpc.NodeServicer):
    def __init__(self, name: str, tier: str, exits: tuple[int, ...]) -> None:
        self.name, self.tier, self.exits = name, tier, exits
        self.behaviour = Behaviour()
        self.generate_requests: list[pb.GenerateRequest] = []
        self.resume_headers: list[pb.HandoffHeader] = []
        self.push_requests: list[pb.PushStateRequest] = []
        self.fetch_requests: list[pb.StateRef] = []
        self._states: dict[str, tuple[pb.GenerateRequest, list[int], int]] = {}
        self._accepted: dict[str, pb.HandoffHeader] = {}
        self._lock = threading.Lock()
        self.num_running = 0
        self.num_cancelled = 0  # streams whose caller went away
        self.server: GrpcServer | None = None

    def start(self, address: str = "127.0.0.1:0") -> int:
        adders = [(pb_grpc.add_NodeServicer_to_server, self)]
        self.server = serve_grpc(adders, address, [service_name("Node")], max_workers=32)
        self.server.set_serving(True)
        return self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0)

    # --- generation ---------------------------------------------------------------------------

    def _source(self, exit_: int) -> pb.Source:
        return pb.Source(node=self.name, tier=TIER.value(self.tier), exit=exit_)

    def _stream(
        self,
        request: pb.GenerateRequest,
        generated: list[int],
        exit_: int,
        context: grpc.ServicerContext,
        has_escalated: bool,
    ) -> Iterator[pb.Chunk]:
        """The token stream; a caller that goes away before the last chunk is counted once in
        `num_cancelled`, whether the stream notices it between tokens or grpc stops pulling
        while a chunk is being sent (the generator is then never resumed, and the RPC's
        termination callback counts it)."""
        ended, counted = [], []

        def cancelled() -> None:
            with self._lock:
                if not counted:
                    counted.append(True)
                    self.num_cancelled += 1

        def on_termination() -> None:
            if not ended:  # the stream neither finished, returned nor aborted: its caller left
                cancelled()

        if not context.add_callback(on_termination):
            on_termination()  # the RPC had already ended
        try:
            for chunk in self._tokens(request, generated, exit_, context, has_escalated, cancelled):
                if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    ended.append(True)  # the last chunk: a caller closing now is not cancelling
                yield chunk
        finally:
            ended.append(True)

    def _tokens(
        self,
        request: pb.GenerateRequest,
        generated: list[int],
        exit_: int,
        context: grpc.ServicerContext,
        has_escalated: bool,
        cancelled: Callable[[], None],
    ) -> Iterator[pb.Chunk]:
        behaviour = self.behaviour
        max_tokens = request.sampling.max_tokens or 8
        escalation = request.escalation
        num_emitted = 0
        while len(generated) < max_tokens:
            offset = len(generated)
            if (
                escalation.enabled
                and escalation.HasField("force_after_tokens")
                and offset == escalation.force_after_tokens
                and not has_escalated
            ):
                has_escalated = True
                deeper = [e for e in MODEL_EXITS if e > exit_]
                target = escalation.force_to_exit if escalation.HasField("force_to_exit") else 0
                target = target or (deeper[0] if deeper else exit_)
                if target in self.exits:
                    exit_ = target  # branch switch on this node: the stream goes on
                elif target > exit_:
                    yield self._handoff_chunk(request, generated, exit_, target)
                    return
            if behaviour.die_after is not None and num_emitted == behaviour.die_after:
                with self._lock:
                    dies = behaviour.num_deaths > 0
                    behaviour.num_deaths -= 1
                if dies:
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} crashed")
            if behaviour.hang_after is not None and num_emitted == behaviour.hang_after:
                behaviour.hang_after = None
                until = time.monotonic() + behaviour.hang_s
                while context.is_active() and time.monotonic() < until:
                    time.sleep(0.05)
            time.sleep(behaviour.token_delay_s)
            if not context.is_active():
                cancelled()
                return
            token = token_id(offset)
            yield pb.Chunk(
                request_id=request.request_id,
                text=f"t{token} ",
                token_ids=[token],
                confidence=[pb.TokenConfidence(max_prob=behaviour.max_prob)],
                source=self._source(exit_),
                token_offset=offset,
            )
            generated.append(token)
            num_emitted += 1
        if behaviour.end_without_finish:
            return
        yield pb.Chunk(
            request_id=request.request_id,
            source=self._source(exit_),
            token_offset=len(generated),
            finish_reason=pb.FINISH_REASON_LENGTH,
        )

    def _handoff_chunk(
        self, request: pb.GenerateRequest, generated: list[int], exit_: int, target: int
    ) -> pb.Chunk:
        handle = uuid.uuid4().hex
        with self._lock:
            self._states[handle] = (request, list(generated), exit_)
        needed = pb.HandoffNeeded(
            from_exit=exit_,
            suggested_to_exit=target,
            reason=pb.HANDOFF_REASON_FORCED,
            state_handle=handle,
            state_bytes=len(HIDDEN_PAYLOAD),
            num_tokens=len(PROMPT_IDS) + len(generated),
            model_fingerprint=FINGERPRINT,
        )
        return pb.Chunk(
            request_id=request.request_id,
            source=self._source(exit_),
            token_offset=len(generated),
            finish_reason=pb.FINISH_REASON_HANDOFF,
            handoff=needed,
        )

    def Generate(self, request, context):  # noqa: N802
        with self._lock:
            self.generate_requests.append(request)
        if self.behaviour.error is not None:
            context.abort(*self.behaviour.error)
        prefix = list(request.prefix_token_ids)
        exit_ = request.overrides.exit
        yield from self._stream(request, prefix, exit_, context, has_escalated=False)

    # --- handoff ------------------------------------------------------------------------------

    def _state_parts(self, ref: pb.StateRef) -> list[pb.ResumeRequest]:
        with self._lock:
            request, generated, from_exit = self._states[ref.state_handle]
        payload = HIDDEN_PAYLOAD if ref.mode == pb.HANDOFF_MODE_HIDDEN else b""
        header = pb.HandoffHeader(
            request_id=request.request_id,
            mode=ref.mode,
            model_fingerprint=FINGERPRINT,
            from_exit=from_exit,
            to_exit=ref.to_exit,
            prompt_token_ids=PROMPT_IDS,
            generated_token_ids=generated,
            total_bytes=len(payload),
            request=request,
        )
        if payload:
            header.tensors.add(name="boundary_hidden", dtype=pb.DTYPE_FLOAT32, num_bytes=1 << 12)
        parts = [pb.ResumeRequest(header=header)]
        if payload:
            parts.append(pb.ResumeRequest(data=pb.StateBytes(offset=0, data=payload)))
        end = pb.StateEnd(total_bytes=len(payload), crc32=zlib.crc32(payload) if payload else 0)
        return [*parts, pb.ResumeRequest(end=end)]

    def FetchState(self, request, context):  # noqa: N802
        with self._lock:
            self.fetch_requests.append(request)
        if self.behaviour.fail_fetch is not None:
            context.abort(self.behaviour.fail_fetch, f"{self.name} cannot fetch")
        if request.state_handle not in self._states:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown state handle")
        yield from self._state_parts(request)

    def PushState(self, request, context):  # noqa: N802
        with self._lock:
            self.push_requests.append(request)
        if self.behaviour.fail_push:
            context.abort(grpc.StatusCode.UNAVAILABLE, "push refused by the test")
        started = time.monotonic()
        parts = self._state_parts(request.state)
        for part in parts:
            if part.HasField("header"):
                part.header.transfer_id = request.transfer_id
        with grpc.insecure_channel(request.destination) as channel:
            reply = pb_grpc.NodeStub(channel).AcceptState(iter(parts), timeout=5)
        duration_ms = (time.monotonic() - started) * 1000
        return pb.PushStateReply(num_bytes=reply.num_bytes, duration_ms=duration_ms)

    def AcceptState(self, request_iterator, context):  # noqa: N802
        parts = list(request_iterator)
        header = parts[0].header
        num_bytes = sum(len(p.data.data) for p in parts if p.HasField("data"))
        with self._lock:
            self._accepted[header.transfer_id] = header
        return pb.AcceptStateReply(transfer_id=header.transfer_id, num_bytes=num_bytes)

    def Resume(self, request_iterator, context):  # noqa: N802
        parts = list(request_iterator)
        header = parts[0].header
        with self._lock:
            self.resume_headers.append(header)
        if self.behaviour.resume_error is not None:
            context.abort(*self.behaviour.resume_error)
        if header.transfer_id:
            with self._lock:
                stored = self._accepted.pop(header.transfer_id, None)
            if stored is None:
                context.abort(grpc.StatusCode.NOT_FOUND, "unknown transfer id")
            to_exit = header.to_exit
            header = stored
        else:
            to_exit = header.to_exit
        if to_exit not in self.exits:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"exit {to_exit} not served")
        generated = list(header.generated_token_ids)
        yield from self._stream(header.request, generated, to_exit, context, has_escalated=True)

    def Info(self, request, context):  # noqa: N802
        return pb.NodeInfo(
            name=self.name,
            tier=TIER.value(self.tier),
            model="smollm2",
            model_fingerprint=FINGERPRINT,
            family="llama",
            exits=self.exits,
            capacity=pb.Capacity(max_batch=8, max_context=2048),
            load=pb.Load(running=self.num_running),
            shape=SHAPE,
            prefill_tokens_per_s=5000.0,
            backend="torch",
        )
