"""Handoff coordination: where an escalating request goes, in which mode, and how its state gets
there (node-to-node push, else relay through the router). See the header of ruyiflow.proto.

`HandoffPlanner.plan` picks the destination node and exit and runs the cost model;
`HandoffPlanner.transfer` moves the state and returns the destination's Resume stream. Bytes and
time are measured by the caller when that stream answers, so both paths are timed the same way:
from the decision until the destination streams again (transfer plus restore).
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from ruyiflow.cluster.topology import Topology
from ruyiflow.cluster.wire import HANDOFF_MODE
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.policy import (
    HandoffDecision,
    RoutePlan,
    choose_handoff_mode,
    pick_node,
    plan_escalation_across,
)
from ruyiflow.router.policy import plan_escalation as plan_deeper
from ruyiflow.router.registry import NodeRegistry

log = logging.getLogger(__name__)

DEFAULT_LINK_BANDWIDTH = 1.25e9  # bytes/s: an undeclared link is taken as fast loopback
DEFAULT_LINK_RTT_MS = 0.05
FALLBACK_PREFILL_TOKENS_PER_S = 2000.0  # a destination that has not measured itself yet
MIN_PUSH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Move:
    """A planned handoff: destination and mode (with the cost estimates behind it)."""

    to_node: str
    to_tier: str
    to_exit: int
    mode: str  # hidden | tokens
    decision: HandoffDecision | None  # None when the cost model could not run (shape unknown)
    model: str | None = None  # set when the move crosses to another model (text only)

    def push_timeout_s(self) -> float:
        estimate = self.decision.tokens if self.decision is not None else None
        if self.decision is not None and self.mode == "hidden" and self.decision.hidden:
            estimate = self.decision.hidden
        return MIN_PUSH_TIMEOUT_S + 4 * (estimate.transfer_s if estimate else 0.0)


class RelayFeed:
    """Source `FetchState` parts as a request iterator for the destination's `Resume`, unchanged
    except header.to_exit; counts bytes and remembers whether the *source* broke."""

    def __init__(
        self, source: str, fetch: grpc.Call, to_exit: int, request: pb.GenerateRequest | None = None
    ) -> None:
        self.source = source
        self.fetch = fetch
        self.to_exit = to_exit
        self.request = request  # settings to continue with (header.request), if given
        self.num_bytes = 0
        self.source_error: grpc.RpcError | None = None
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[pb.ResumeRequest]:
        try:
            for part in self.fetch:
                if part.WhichOneof("part") == "header":
                    part.header.to_exit = self.to_exit
                    if self.request is not None:
                        part.header.request.CopyFrom(self.request)
                with self._lock:
                    self.num_bytes += part.ByteSize()
                yield part
        except grpc.RpcError as exc:
            self.source_error = exc
            raise  # grpc cancels the Resume call; the caller blames the source, not the dest

    def cancel(self) -> None:
        self.fetch.cancel()


@dataclass
class Transfer:
    """The destination's Resume stream and what moving the state cost so far."""

    call: grpc.Call
    pushed: bool
    pushed_bytes: int = 0
    feed: RelayFeed | None = None

    @property
    def num_bytes(self) -> int:
        return self.feed.num_bytes if self.feed is not None else self.pushed_bytes


class HandoffPlanner:
    """Plans and performs handoffs for the router (stateless per request)."""

    def __init__(self, topology: Topology, registry: NodeRegistry, rng: random.Random) -> None:
        self.topology = topology
        self.registry = registry
        self.rng = rng

    def destination(self, source: str, from_exit: int, needed: pb.HandoffNeeded) -> RoutePlan:
        """Exit and candidate nodes: a deeper exit of the same model (the node's suggestion if
        served); for a draining source, the suggested exit elsewhere; with nothing deeper, the
        hardest threshold's model if that is another one, else the same exit (the request
        continues where it can)."""
        model = self.registry.spec(source).model
        served = self.topology.exit_tiers(model)
        if needed.reason == pb.HANDOFF_REASON_DRAIN:
            exit_ = needed.suggested_to_exit if needed.suggested_to_exit in served else from_exit
            names = tuple(n.name for n in self.topology.nodes_serving(model, exit_))
            return RoutePlan(model, served[exit_][0], exit_, tuple(n for n in names if n != source))
        plan = plan_deeper(self.topology, model, from_exit, needed.suggested_to_exit)
        if plan is None:
            plan = plan_escalation_across(self.topology, model)
        if plan is not None:
            return plan
        names = tuple(n.name for n in self.topology.nodes_serving(model, from_exit))
        return RoutePlan(model, served[from_exit][0], from_exit, names)

    def plan(self, source: str, from_exit: int, needed: pb.HandoffNeeded, requested: str) -> Move:
        """Destination node (two random choices by load) and mode (cost model); raises
        NodeUnavailable when no node serving the destination exit is healthy."""
        target = self.destination(source, from_exit, needed)
        to_node = pick_node(self.registry.loads(target.candidates), self.rng).name
        to_tier = self.registry.spec(to_node).tier
        if target.model != self.registry.spec(source).model:
            # Another tokenizer: neither hidden states nor token ids mean anything there; the
            # destination re-encodes the relayed text (the session sends it as prefix_text).
            return Move(to_node, to_tier, target.exit, "tokens", None, model=target.model)
        source_info, dest_info = self.registry.info(source), self.registry.info(to_node)
        fingerprint = needed.model_fingerprint or getattr(source_info, "model_fingerprint", "")
        dest_fingerprint = getattr(dest_info, "model_fingerprint", "")
        same_model = bool(fingerprint) and dest_fingerprint == fingerprint
        if requested == "hidden" and not same_model:
            log.info("hidden handoff %s -> %s across models: using tokens", source, to_node)
            requested = "tokens"
        shape = source_info.shape if source_info is not None else None
        if shape is None or shape.num_layers == 0 or target.exit < from_exit:
            # Nothing to cost `hidden` with (no shape, or a drain to a shallower exit): honour
            # an explicit mode (a node refusing it falls back to tokens), else take tokens.
            mode = requested if requested != "auto" else "tokens"
            return Move(to_node, to_tier, target.exit, mode, None)
        link = self.topology.link(source, to_node)
        if source == to_node:
            bandwidth, rtt_ms = float("inf"), 0.0
        elif link is not None:
            bandwidth, rtt_ms = link.bandwidth, link.rtt_ms
        else:
            bandwidth, rtt_ms = DEFAULT_LINK_BANDWIDTH, DEFAULT_LINK_RTT_MS
        prefill = getattr(dest_info, "prefill_tokens_per_s", 0.0) or FALLBACK_PREFILL_TOKENS_PER_S
        decision = choose_handoff_mode(
            needed.num_tokens,
            shape.hidden_size,
            from_exit,
            shape.num_kv_heads,
            shape.head_dim,
            shape.dtype_bytes,
            bandwidth,
            rtt_ms,
            prefill,
            same_model,
            dest_layers=target.exit + 1,
            requested=requested,
        )
        log.debug("handoff %s -> %s: %s", source, to_node, decision.as_dict())
        return Move(to_node, to_tier, target.exit, decision.mode, decision)

    def transfer(
        self,
        source: str,
        handle: str,
        move: Move,
        request_id: str,
        request: pb.GenerateRequest | None = None,
    ) -> Transfer:
        """Push the state source → destination and open Resume there; if the push fails, relay
        FetchState parts into Resume. Errors of the Resume stream surface when it is read.
        `request`: the settings the destination continues with (its escalation and gate)."""
        ref = pb.StateRef(
            state_handle=handle, mode=HANDOFF_MODE.value(move.mode), to_exit=move.to_exit
        )
        dest = self.registry.spec(move.to_node)
        dest_stub = self.registry.stub(move.to_node)
        if self.topology.router.handoff.push:
            transfer_id = uuid.uuid4().hex
            push = pb.PushStateRequest(state=ref, destination=dest.listen, transfer_id=transfer_id)
            try:
                reply = self.registry.stub(source).PushState(push, timeout=move.push_timeout_s())
            except grpc.RpcError as exc:
                log.warning(
                    "push %s -> %s failed (%s: %s); relaying",
                    source,
                    move.to_node,
                    exc.code(),
                    exc.details(),
                )
            else:
                header = pb.HandoffHeader(
                    request_id=request_id,
                    mode=ref.mode,
                    to_exit=move.to_exit,
                    transfer_id=transfer_id,
                    request=request,
                )
                parts = [pb.ResumeRequest(header=header), pb.ResumeRequest(end=pb.StateEnd())]
                return Transfer(dest_stub.Resume(iter(parts)), True, reply.num_bytes)
        feed = RelayFeed(source, self.registry.stub(source).FetchState(ref), move.to_exit, request)
        return Transfer(dest_stub.Resume(iter(feed)), False, feed=feed)
