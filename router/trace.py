"""The route trace of one request, built while it streams: spans, handoffs, the confidence
gate's looks (why a request started or moved where it did), timing, retries.

Times are `time.monotonic()` seconds; the trace reports milliseconds since the router received
the request. `queue_ms` is the time until the first node call was placed (scoring, planning and
waiting for a node), `ttft_ms` until the first token reached the client.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ruyiflow.cluster.wire import HANDOFF_MODE, HANDOFF_REASON, TIER
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.metrics import RouterMetrics


def reason_label(reason: int) -> str:
    """Metric label of a pb.HandoffReason (unspecified counts as low confidence)."""
    return HANDOFF_REASON.names.get(reason, "low_confidence")


@dataclass
class PendingMove:
    """A move whose cost is known once its destination answers: then `TraceBuilder.record_move`
    turns it into a HandoffRecord and a metrics observation."""

    from_node: str
    from_tier: str
    from_exit: int
    mode: str  # hidden | tokens
    reason: int  # pb.HandoffReason
    started: float
    num_bytes: int = 0
    pushed: bool = False


class TraceBuilder:
    """Accumulates a `RouteTrace`; one per request, used from the request's thread only."""

    def __init__(self, started: float, difficulty: float = 0.0) -> None:
        self.started = started
        self.difficulty = difficulty
        self.is_scored = False
        self.placed_at: float | None = None
        self.first_token_at: float | None = None
        self.spans: list[pb.RouteSpan] = []
        self.handoffs: list[pb.HandoffRecord] = []
        self.gate: list[pb.GateCheck] = []
        self.num_retries = 0
        self.deeper_for_load_from = 0  # the planned exit, when the request started deeper
        self.num_tokens = 0

    @property
    def current(self) -> pb.RouteSpan | None:
        return self.spans[-1] if self.spans else None

    def open_span(self, node: str, tier: str, exit_: int) -> None:
        """A node starts serving the request at `exit_`; the first call also ends queueing."""
        if self.placed_at is None:
            self.placed_at = time.monotonic()
        self.spans.append(pb.RouteSpan(node=node, tier=TIER.value(tier), exit=exit_))

    def drop_empty_span(self) -> None:
        """Forget the last span if it produced nothing (a destination that never answered)."""
        if self.spans and self.spans[-1].num_tokens == 0:
            self.spans.pop()

    def add_tokens(self, num_tokens: int, now: float) -> None:
        if num_tokens and self.first_token_at is None:
            self.first_token_at = now
        self.num_tokens += num_tokens
        if self.current is not None:
            self.current.num_tokens += num_tokens

    def add_handoff(
        self,
        from_node: str,
        to_node: str,
        from_exit: int,
        to_exit: int,
        mode: int = pb.HANDOFF_MODE_UNSPECIFIED,
        num_bytes: int = 0,
        duration_s: float = 0.0,
        reason: int = pb.HANDOFF_REASON_LOW_CONFIDENCE,
        pushed: bool = False,
    ) -> pb.HandoffRecord:
        record = pb.HandoffRecord(
            from_node=from_node,
            to_node=to_node,
            from_exit=from_exit,
            to_exit=to_exit,
            mode=mode,
            num_bytes=num_bytes,
            duration_ms=duration_s * 1000.0,
            reason=reason,
            pushed=pushed,
        )
        self.handoffs.append(record)
        return record

    def record_move(
        self,
        move: PendingMove,
        to_node: str,
        to_tier: str,
        to_exit: int,
        num_bytes: int,
        metrics: RouterMetrics,
    ) -> None:
        """A move between nodes completed: trace it and count it (time ends now)."""
        seconds = time.monotonic() - move.started
        mode = HANDOFF_MODE.value(move.mode)
        self.add_handoff(
            move.from_node,
            to_node,
            move.from_exit,
            to_exit,
            mode,
            num_bytes,
            seconds,
            move.reason,
            move.pushed,
        )
        label = reason_label(move.reason)
        metrics.observe_handoff(move.from_tier, to_tier, move.mode, label, num_bytes, seconds)

    def record_branch_switch(
        self,
        node: str,
        tier: str,
        from_exit: int,
        to_exit: int,
        metrics: RouterMetrics,
        reason: int = pb.HANDOFF_REASON_LOW_CONFIDENCE,
    ) -> None:
        """A node escalated in place: a zero-byte move on one node and a new span."""
        self.add_handoff(node, node, from_exit, to_exit, reason=reason)
        if to_exit > from_exit:
            metrics.observe_escalation(tier, tier, reason_label(reason))
        self.open_span(node, tier, to_exit)

    def add_gate(self, node: str, checks: Sequence[pb.GateCheck]) -> None:
        """The gate's looks a node reported (`Chunk.gate`), in order."""
        for check in checks:
            record = pb.GateCheck()
            record.CopyFrom(check)
            record.node = node
            self.gate.append(record)

    def add_skipped(self, exit_: int, to_exit: int) -> None:
        """The thresholds picked `exit_`, where nothing is certified: the request started at
        `to_exit` without computing anything there."""
        self.gate.append(pb.GateCheck(exit=exit_, to_exit=to_exit, skipped=True))

    def gate_moved(self, from_exit: int) -> bool:
        """Whether the last look of the gate at `from_exit` sent the request on."""
        looks = [g for g in self.gate if g.exit == from_exit and not g.skipped]
        return bool(looks) and not looks[-1].passed

    def first_served(self) -> tuple[str, int] | None:
        """(tier, exit) of the first span that produced tokens, else of the first span."""
        spans = [s for s in self.spans if s.num_tokens] or self.spans
        if not spans:
            return None
        tier = TIER.name(spans[0].tier)
        return tier, spans[0].exit

    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def build(self, now: float) -> pb.RouteTrace:
        def ms(at: float | None) -> float:
            return 0.0 if at is None else (at - self.started) * 1000.0

        return pb.RouteTrace(
            spans=self.spans,
            handoffs=self.handoffs,
            difficulty=self.difficulty,
            timing=pb.Timing(
                queue_ms=ms(self.placed_at), ttft_ms=ms(self.first_token_at), total_ms=ms(now)
            ),
            num_retries=self.num_retries,
            gate=self.gate,
            deeper_for_load_from=self.deeper_for_load_from,
        )
