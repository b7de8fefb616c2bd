"""Route traces for people and for JSON: `format_trace` (what `ruyiflow query` prints after the
answer) and `trace_to_dict` (what `--json` emits). Enum values appear as short lowercase names
(`edge`, `hidden`, `low_confidence`)."""

from __future__ import annotations

from typing import Any

from ruyiflow.cluster.wire import HANDOFF_MODE, HANDOFF_REASON, TIER
from ruyiflow.proto import ruyiflow_pb2 as pb


def trace_to_dict(trace: pb.RouteTrace) -> dict[str, Any]:
    """Plain JSON-ready dict of a RouteTrace (`deeper_for_load_from` only when set)."""
    out = {
        "difficulty": round(float(trace.difficulty), 4),
        "spans": [
            {
                "node": s.node,
                "tier": TIER.name(s.tier),
                "exit": s.exit,
                "num_tokens": s.num_tokens,
            }
            for s in trace.spans
        ],
        "handoffs": [
            {
                "from_node": h.from_node,
                "to_node": h.to_node,
                "from_exit": h.from_exit,
                "to_exit": h.to_exit,
                "mode": HANDOFF_MODE.name(h.mode),
                "num_bytes": h.num_bytes,
                "duration_ms": round(h.duration_ms, 3),
                "reason": HANDOFF_REASON.name(h.reason),
                "pushed": h.pushed,
            }
            for h in trace.handoffs
        ],
        "gate": [gate_to_dict(g) for g in trace.gate],
        "timing": {
            "queue_ms": round(trace.timing.queue_ms, 3),
            "ttft_ms": round(trace.timing.ttft_ms, 3),
            "total_ms": round(trace.timing.total_ms, 3),
        },
        "num_retries": trace.num_retries,
    }
    if trace.deeper_for_load_from:
        out["deeper_for_load_from"] = trace.deeper_for_load_from
    return out


def gate_to_dict(g: pb.GateCheck) -> dict[str, Any]:
    """One look of the confidence gate as plain JSON (absent values are null)."""
    c = g.confidence
    return {
        "node": g.node,
        "exit": g.exit,
        "skipped": g.skipped,
        "measure": g.measure,
        "value": round(g.value, 6) if g.HasField("value") else None,
        "threshold": round(g.threshold, 6) if g.HasField("threshold") else None,
        "passed": g.passed,
        "to_exit": g.to_exit or None,
        "confidence": None
        if g.skipped
        else {
            "max_prob": round(c.max_prob, 4),
            "margin": round(c.margin, 4),
            "entropy": round(c.entropy, 4),
        },
    }


def format_gate(g: pb.GateCheck) -> str:
    """One line: a skipped exit, or what the gate compared at an exit and what followed."""
    if g.skipped:
        return f"  gate     exit {g.exit}: no threshold certified, starts at exit {g.to_exit}"
    first = f"first token max_prob {g.confidence.max_prob:.3f}"
    if not g.HasField("threshold"):
        verdict = f"{first}; no threshold certified at this exit"
    else:
        rule = "<=" if g.measure == "entropy" else ">="
        verdict = (
            f"{g.measure} {g.value:.4f} {rule} {g.threshold:.4f}? {'yes' if g.passed else 'no'}"
        )
    where = f"{g.node}@{g.exit}" if g.node else f"exit {g.exit}"
    outcome = "streams from here" if g.passed else f"moves to exit {g.to_exit} before streaming"
    return f"  gate     {where}: {verdict} -> {outcome}"


def format_bytes(num_bytes: int) -> str:
    if num_bytes < 1 << 10:
        return f"{num_bytes} B"
    if num_bytes < 1 << 20:
        return f"{num_bytes / (1 << 10):.1f} KiB"
    return f"{num_bytes / (1 << 20):.1f} MiB"


def format_trace(trace: pb.RouteTrace) -> str:
    """Multi-line, human-readable route trace."""
    num_tokens = sum(s.num_tokens for s in trace.spans)
    lines = [
        f"route: difficulty {trace.difficulty:.2f}, {num_tokens} tokens, "
        f"{len(trace.handoffs)} handoff(s), {trace.num_retries} retr"
        + ("y" if trace.num_retries == 1 else "ies")
    ]
    if trace.deeper_for_load_from:
        lines.append(
            f"  load     exit {trace.deeper_for_load_from} had no room: started deeper, "
            f"at exit {trace.spans[0].exit if trace.spans else '?'}"
        )
    lines.extend(format_gate(g) for g in trace.gate)
    for span in trace.spans:
        lines.append(
            f"  span     {span.node:<12} {TIER.name(span.tier):<5} exit {span.exit:<4} "
            f"{span.num_tokens} tokens"
        )
    for move in trace.handoffs:
        where = f"{move.from_node}@{move.from_exit} -> {move.to_node}@{move.to_exit}"
        if move.from_node == move.to_node and move.mode == pb.HANDOFF_MODE_UNSPECIFIED:
            how = "branch switch"
        else:
            how = (
                f"{HANDOFF_MODE.name(move.mode)}, {format_bytes(move.num_bytes)}, "
                f"{move.duration_ms:.1f} ms, {'pushed' if move.pushed else 'relayed'}"
            )
        lines.append(f"  handoff  {where} ({HANDOFF_REASON.name(move.reason)}): {how}")
    timing = trace.timing
    lines.append(
        f"timing: queue {timing.queue_ms:.1f} ms, first token {timing.ttft_ms:.1f} ms, "
        f"total {timing.total_ms:.1f} ms"
    )
    return "\n".join(lines)
