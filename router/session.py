"""One request's life on the router once it is planned: stream from a node and relay to the
client; on a HANDOFF chunk move the request deeper; when a node breaks, resume elsewhere from the
tokens already relayed. The client's stream never misses or repeats a token: the router rewrites
`token_offset` from its own count of relayed tokens, and a resumed node gets exactly those
tokens as `prefix_token_ids` - or, on a node whose model tokenizes differently (a move across
models, e.g. Ruyi -> MoE), the relayed text as `prefix_text`.

The node-facing failure cases (what to retry, whom to blame) live in `router.failover`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import grpc

from ruyiflow.cluster.errors import NodeUnavailable, RetryLater
from ruyiflow.cluster.topology import Topology
from ruyiflow.cluster.wire import UNKNOWN_TOKEN_ID
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.failover import StreamBroken, classify_error, failover_target
from ruyiflow.router.handoff import HandoffPlanner, RelayFeed
from ruyiflow.router.metrics import RouterMetrics
from ruyiflow.router.policy import (
    RETRY_AFTER_S,
    RoutePlan,
    choose_placement,
    pick_node,
    placement_order,
)
from ruyiflow.router.registry import NodeRegistry
from ruyiflow.router.requests import estimate_tokens, node_request
from ruyiflow.router.resume import StreamSigner
from ruyiflow.router.trace import PendingMove, TraceBuilder, reason_label
from ruyiflow.router.watchdog import IdleWatchdog

log = logging.getLogger(__name__)

MAX_HANDOFFS = 16  # guards against two nodes handing a request back and forth forever


class ClientCancelled(Exception):
    """The client went away; the request ends quietly."""


@dataclass
class Placement:
    """The node stream a request is reading now."""

    node: str
    tier: str
    exit: int
    call: grpc.Call
    pending: PendingMove | None = None  # a move this stream completes, recorded on its answer
    feed: RelayFeed | None = None
    move_reason: int | None = None  # reason of the handoff this Resume stream continues
    num_tokens: int = 0
    is_closed: bool = field(default=False)


class RequestSession:
    """Drives one Generate call; `run()` yields the client's chunks."""

    def __init__(
        self,
        topology: Topology,
        registry: NodeRegistry,
        metrics: RouterMetrics,
        rng: random.Random,
        request: pb.GenerateRequest,
        request_id: str,
        requested_mode: str,
        trace: TraceBuilder,
        context: grpc.ServicerContext,
        on_placed: Callable[[], None] = lambda: None,
        on_final: Callable[[], None] = lambda: None,
        watchdog: IdleWatchdog | None = None,
        signer: StreamSigner | None = None,
    ) -> None:
        self.topology, self.registry, self.metrics, self.rng = topology, registry, metrics, rng
        self.planner = HandoffPlanner(topology, registry, rng)
        self.request, self.request_id, self.requested_mode = request, request_id, requested_mode
        self.trace, self.context = trace, context
        self._on_placed, self._on_final = on_placed, on_final
        self._watchdog = watchdog
        self.relayed: list[int] = []  # every token sent to the client, in order
        self.relayed_text = ""  # their text, as the client saw it
        self._signer = signer  # signs what was sent, for a resume on another router
        if request.HasField("resume"):  # another router sent these (checked by the caller)
            self.relayed = list(request.resume.token_ids)
            self.relayed_text = request.resume.text
        self._ids_model: str | None = None  # the model whose tokenizer made `relayed`
        # True once `relayed` mixes tokenizers (after a model change) or holds ids a node could
        # not know (a node without a tokenizer): the next node resumes from the text
        self._text_only = UNKNOWN_TOKEN_ID in self.relayed
        self.is_cancelled = False
        self._work = estimate_tokens(request)
        self._exclude: set[str] = set()
        self._can_escalate = True  # False once no deeper exit could be reached
        self._last_token_at: float | None = None
        self._lock = threading.Lock()
        self._current: Placement | None = None
        context.add_callback(self._cancel_current)  # client gone -> stop reading the node

    def run(self, plan: RoutePlan) -> Iterator[pb.Chunk]:
        """Score and plan are done; stream → hand off → fail over until a final chunk."""
        try:
            placement = self._place(plan)
            while True:
                try:
                    needed = yield from self._relay(placement)
                except StreamBroken as broken:
                    placement = self._fail_over(placement, broken)
                    continue
                if needed is None:
                    return
                placement = self._hand_off(placement, needed)
        except ClientCancelled:
            self.is_cancelled = True
        finally:
            self._cancel_current()

    def _place(self, plan: RoutePlan) -> Placement:
        """Start on the plan's nodes; when none has room, on the nearest deeper exit that has
        (said in the trace), unless the client pinned the exit, tier or node."""
        given = self.request.overrides
        order = [(plan.exit, plan.candidates)]
        if not (given.HasField("exit") or given.HasField("node") or given.HasField("tier")):
            order = placement_order(self.topology, plan)
        loads = [(exit_, self.registry.loads(names)) for exit_, names in order]
        try:
            exit_, node = choose_placement(loads, self.rng)
        except NodeUnavailable:
            names = ", ".join(plan.candidates) or "none"
            raise NodeUnavailable(
                f"no healthy node serves exit {plan.exit} on tier {plan.tier} or a deeper exit "
                f"(nodes: {names})"
            ) from None
        if exit_ != plan.exit:
            self.trace.deeper_for_load_from = plan.exit
            log.info(
                "request %s: exit %d has no room; starting at %d", self.request_id, plan.exit, exit_
            )
        self._ids_model = plan.model
        if plan.scored_exit is not None:
            self.trace.add_skipped(plan.scored_exit, plan.exit)
        return self._generate(node.name, exit_)

    def _generate(self, node: str, exit_: int, pending: PendingMove | None = None) -> Placement:
        text_only = self._text_only or self.registry.spec(node).model != self._ids_model
        prefix_text = self.relayed_text if text_only else None
        request = node_request(
            self.request, self.request_id, self.topology, exit_, self.relayed, prefix_text
        )
        if not self._can_escalate:
            request.escalation.enabled = False
        return self._start(node, exit_, self.registry.stub(node).Generate(request), pending)

    def _start(
        self,
        node: str,
        exit_: int,
        call: grpc.Call,
        pending: PendingMove | None = None,
        feed: RelayFeed | None = None,
    ) -> Placement:
        placement = Placement(node, self.registry.spec(node).tier, exit_, call, pending, feed)
        self.registry.acquire(node, self._work)
        if not self.trace.spans:
            self._on_placed()
        self.trace.open_span(node, placement.tier, exit_)
        with self._lock:
            self._current = placement
        if not self.context.is_active():
            self._cancel_current()
        return placement

    def _relay(self, placement: Placement) -> Generator[pb.Chunk, None, pb.HandoffNeeded | None]:
        """Relay one node stream; returns the HandoffNeeded that ended it, or None when the
        client's final chunk was sent. Raises StreamBroken when the stream fails."""
        watch = None
        if self._watchdog is not None:
            node = placement.node
            watch = self._watchdog.watch(
                placement.call.cancel, lambda: self.registry.is_answering(node)
            )
        try:
            for chunk in placement.call:
                if watch is not None:
                    watch.touch()
                self._settle(placement)
                if chunk.gate:
                    self.trace.add_gate(placement.node, chunk.gate)
                self._check_branch_switch(placement, chunk)
                if chunk.finish_reason == pb.FINISH_REASON_HANDOFF:
                    if chunk.token_ids:
                        yield self._to_client(chunk, placement, is_final=False)
                    return chunk.handoff
                yield self._to_client(chunk, placement, is_final=True)
                if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    return None
        except grpc.RpcError as exc:
            if not self.context.is_active():
                raise ClientCancelled() from None
            if watch is not None and watch.expired:
                idle = self._watchdog.timeout_s
                raise StreamBroken(
                    placement.node,
                    f"sent nothing for {idle:g} s",
                    placement.node,
                    code=grpc.StatusCode.DEADLINE_EXCEEDED,
                ) from None
            feed = placement.feed
            source_failure = None
            if feed is not None and feed.source_error is not None:
                source_failure = (feed.source, feed.source_error)
            refused = placement.move_reason if placement.num_tokens == 0 else None
            raise classify_error(exc, placement.node, source_failure, refused) from None
        finally:
            if watch is not None:
                self._watchdog.forget(watch)
            self._close(placement)
        raise StreamBroken(placement.node, "stream ended without a finish reason", placement.node)

    def _to_client(self, chunk: pb.Chunk, placement: Placement, is_final: bool) -> pb.Chunk:
        out = pb.Chunk()
        out.CopyFrom(chunk)
        out.request_id = self.request_id
        out.token_offset = len(self.relayed)  # continuous across handoffs and failovers
        out.ClearField("handoff")
        if not is_final:
            out.finish_reason = pb.FINISH_REASON_UNSPECIFIED
        now = time.monotonic()
        num_tokens = len(chunk.token_ids)
        if num_tokens:
            gap = None if self._last_token_at is None else now - self._last_token_at
            self.metrics.observe_tokens(placement.exit, placement.tier, num_tokens, gap)
            self._last_token_at = now
            self.relayed.extend(chunk.token_ids)
            if UNKNOWN_TOKEN_ID in chunk.token_ids:  # a node without a tokenizer: resume by text
                self._text_only = True
            placement.num_tokens += num_tokens
        self.relayed_text += chunk.text
        if self._signer is not None:
            self._signer.add(chunk.token_ids, chunk.text)
            out.resume_token = self._signer.token()
        self.trace.add_tokens(num_tokens, now)
        if out.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            out.trace.CopyFrom(self.trace.build(now))
            self._on_final()
        return out

    def _check_branch_switch(self, placement: Placement, chunk: pb.Chunk) -> None:
        """A node that serves a deeper exit escalates in place: the stream's source.exit
        changes. That is a span change and a zero-byte move on the same node."""
        new_exit = chunk.source.exit
        if not new_exit or new_exit == placement.exit:
            return
        if new_exit not in self.registry.spec(placement.node).exits:
            log.warning("%s reported exit %d it does not serve", placement.node, new_exit)
            return
        gated = self.trace.gate_moved(placement.exit)
        reason = pb.HANDOFF_REASON_GATE if gated else pb.HANDOFF_REASON_LOW_CONFIDENCE
        self.trace.record_branch_switch(
            placement.node, placement.tier, placement.exit, new_exit, self.metrics, reason
        )
        placement.exit = new_exit

    def _settle(self, placement: Placement) -> None:
        """Record the move that led to `placement` once its destination answered (or broke)."""
        move, placement.pending = placement.pending, None
        if move is None:
            return
        num_bytes = placement.feed.num_bytes if placement.feed is not None else move.num_bytes
        self.trace.record_move(
            move, placement.node, placement.tier, placement.exit, num_bytes, self.metrics
        )

    def _hand_off(self, placement: Placement, needed: pb.HandoffNeeded) -> Placement:
        if len(self.trace.handoffs) >= MAX_HANDOFFS:
            raise RuntimeError(f"request moved {MAX_HANDOFFS} times; giving up")
        from_exit = needed.from_exit or placement.exit
        reason = needed.reason or pb.HANDOFF_REASON_LOW_CONFIDENCE
        started = time.monotonic()
        try:
            move = self.planner.plan(placement.node, from_exit, needed, self.requested_mode)
            if move.model is not None and self.request.WhichOneof("prompt") == "token_ids":
                raise NodeUnavailable(f"a token-id prompt cannot move to model {move.model!r}")
        except NodeUnavailable as exc:
            # Nothing healthy serves a deeper exit: carry on in tokens mode where possible,
            # without escalating again (the source would only ask once more).
            log.info("request %s cannot escalate (%s); continuing", self.request_id, exc)
            self._can_escalate = False
            broken = StreamBroken(placement.node, str(exc), None, reason=reason)
            return self._resume_from_tokens(placement, broken)
        if move.to_exit > from_exit or move.model is not None:
            self.metrics.observe_escalation(placement.tier, move.to_tier, reason_label(reason))
        if move.model is not None:  # another model: it re-encodes the relayed text
            self._text_only = True
            num_bytes = len(self.relayed_text.encode())
            pending = PendingMove(
                placement.node, placement.tier, from_exit, "tokens", reason, started, num_bytes
            )
            placement = self._generate(move.to_node, move.to_exit, pending)
            placement.move_reason = reason
            return placement
        restart = None
        if reason == pb.HANDOFF_REASON_GATE and not self.relayed:
            # the gate moved the prompt before any token: the destination starts it as a
            # request routed there would (its gate looks again, escalation as configured)
            restart = node_request(self.request, self.request_id, self.topology, move.to_exit, [])
        transfer = self.planner.transfer(
            placement.node, needed.state_handle, move, self.request_id, restart
        )
        pending = PendingMove(
            placement.node,
            placement.tier,
            from_exit,
            move.mode,
            reason,
            started,
            transfer.pushed_bytes,
            transfer.pushed,
        )
        placement = self._start(move.to_node, move.to_exit, transfer.call, pending, transfer.feed)
        placement.move_reason = reason
        return placement

    def _fail_over(self, placement: Placement, broken: StreamBroken) -> Placement:
        if broken.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            # A full node (the router's view of its load lagged): not a failure, and no retry
            # is used; each full node is excluded, so this ends.
            self._exclude.add(placement.node)
            moved = self._resume_from_tokens(placement, broken, deeper_only=True)
            if moved.exit > placement.exit and not self.relayed:
                self.trace.deeper_for_load_from = placement.exit  # started deeper after all
            return moved
        max_retries = self.topology.router.handoff.max_retries
        if self.trace.num_retries >= max_retries:
            raise broken.final_error(max_retries)
        self.trace.num_retries += 1
        self.metrics.observe_retry(placement.tier)
        log.warning("request %s: %s; resuming elsewhere", self.request_id, broken)
        if broken.blame is not None:
            self.registry.mark_failed(broken.blame)
        if broken.exclude is not None:
            self._exclude.add(broken.exclude)
        return self._resume_from_tokens(placement, broken)

    def _resume_from_tokens(
        self, placement: Placement, broken: StreamBroken, deeper_only: bool = False
    ) -> Placement:
        """`Node.Generate` with the relayed tokens as prefix, on the nearest healthy exit.
        If `placement` was a move's destination that never answered, that move is replaced:
        the record runs from the move's source, and the silent destination leaves no span."""
        model = self.registry.spec(placement.node).model
        origin, reason = placement.pending, broken.reason
        if origin is not None:
            self.trace.drop_empty_span()
            reason = reason or origin.reason  # the move still happens, in tokens mode
        else:
            origin = PendingMove(
                placement.node, placement.tier, placement.exit, "tokens", 0, time.monotonic()
            )
        target = failover_target(
            self.topology, self.registry, model, placement.exit, self._exclude, deeper_only
        )
        if target is None:
            if broken.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise RetryLater(f"{broken}; every other node is full or down", RETRY_AFTER_S)
            raise broken.final_error(None)
        exit_, candidates = target
        node = pick_node(self.registry.loads(candidates), self.rng).name
        pending = None
        if reason is not None:
            pending = PendingMove(
                origin.from_node,
                origin.from_tier,
                origin.from_exit,
                "tokens",
                reason,
                origin.started,
                4 * len(self.relayed),  # the ids travel inside the request
            )
        return self._generate(node, exit_, pending)

    def _close(self, placement: Placement) -> None:
        with self._lock:
            if placement.is_closed:
                return
            placement.is_closed = True
        placement.call.cancel()  # no-op once the stream has finished
        if placement.feed is not None:
            placement.feed.cancel()
        self.registry.release(placement.node, self._work)

    def _cancel_current(self) -> None:
        with self._lock:
            current = self._current
        if current is not None:
            self._close(current)
