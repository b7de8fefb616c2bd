"""What the router does when a node stream fails: which errors are worth another node, whom to
blame (mark unhealthy), where to resume, and what the client sees when nothing is left.

| node status                                   | router                                      |
|-----------------------------------------------|---------------------------------------------|
| UNAVAILABLE, CANCELLED, UNKNOWN, INTERNAL;     | mark the node failed, resume elsewhere from |
| stream ended without a finish reason           | the relayed tokens (bounded retries)        |
| RESOURCE_EXHAUSTED                             | try another node; else pass it through      |
| INVALID_ARGUMENT, FAILED_PRECONDITION,         | a refused handoff state: resume in tokens   |
| NOT_FOUND on a Resume that produced nothing    | mode instead; otherwise pass through        |
| anything else                                  | pass through, same code and details         |
"""

from __future__ import annotations

import grpc

from ruyiflow.cluster.errors import NodeUnavailable
from ruyiflow.cluster.grpc_errors import UpstreamStatus
from ruyiflow.cluster.topology import Topology
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.router.registry import NodeRegistry

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
REFUSED_STATE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }
)
_SAME = object()


class StreamBroken(Exception):
    """A node stream failed in a way another node may fix. `blame` is marked unhealthy,
    `exclude` is not tried again for this request, and `reason` (None: no record) labels the
    resulting move."""

    def __init__(
        self,
        node: str,
        details: str,
        blame: str | None,
        *,
        code: grpc.StatusCode | None = None,
        exclude: object = _SAME,
        reason: int | None = pb.HANDOFF_REASON_NODE_FAILURE,
    ) -> None:
        super().__init__(details)
        self.node, self.details, self.blame, self.code = node, details, blame, code
        self.exclude: str | None = blame if exclude is _SAME else exclude  # type: ignore[assignment]
        self.reason = reason

    def __str__(self) -> str:
        code = f"{self.code.name}: " if self.code is not None else ""
        return f"node {self.node} failed ({code}{self.details})"

    def final_error(self, max_retries: int | None) -> Exception:
        """What the client gets when no retry is left (`max_retries`) or no node is."""
        if self.code == grpc.StatusCode.RESOURCE_EXHAUSTED or self.code in REFUSED_STATE:
            return UpstreamStatus(self.code, self.details)
        if max_retries is not None:
            return NodeUnavailable(f"{self}; all {max_retries} retries are used")
        return NodeUnavailable(f"{self}; no other healthy node can resume the request")


def classify_error(
    exc: grpc.RpcError,
    node: str,
    source_failure: tuple[str, grpc.RpcError] | None,
    refused_move_reason: int | None,
) -> Exception:
    """Exception to raise for a node stream's RpcError (StreamBroken or UpstreamStatus).
    `source_failure` is (source, its error) when a relay's *source* broke and the destination
    only saw its requests end; `refused_move_reason` is set when the stream is a Resume that
    has produced nothing yet, so a refused or lost state can fall back to tokens mode."""
    if source_failure is not None:
        source, error = source_failure
        code, details = error.code(), error.details() or ""
        if code in RETRYABLE:
            return StreamBroken(source, details, source, code=code)
        # The source is alive but the state is gone (expired handle, say): no one to blame.
        reason = refused_move_reason or pb.HANDOFF_REASON_NODE_FAILURE
        return StreamBroken(source, details, None, code=code, exclude=None, reason=reason)
    code, details = exc.code(), exc.details() or ""
    if code in RETRYABLE:
        return StreamBroken(node, details, node, code=code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return StreamBroken(node, details, None, code=code, exclude=node, reason=None)
    if code in REFUSED_STATE and refused_move_reason is not None:
        reason = refused_move_reason
        return StreamBroken(node, details, None, code=code, exclude=None, reason=reason)
    return UpstreamStatus(code, details)


def failover_target(
    topology: Topology,
    registry: NodeRegistry,
    model: str,
    exit_: int,
    exclude: set[str],
    deeper_only: bool = False,
) -> tuple[int, list[str]] | None:
    """(exit, available nodes) to resume at: `exit_` on another node, else the nearest deeper
    exit, else (unless `deeper_only`) the nearest shallower one; None when no node of `model`
    is available."""
    served = [e for e in topology.exit_tiers(model) if e >= exit_ or not deeper_only]
    order = sorted(served, key=lambda e: (e != exit_, e < exit_, abs(e - exit_)))
    for candidate in order:
        names = [
            n.name
            for n in topology.nodes_serving(model, candidate)
            if n.name not in exclude and registry.is_available(n.name)
        ]
        if names:
            return candidate, names
    return None
