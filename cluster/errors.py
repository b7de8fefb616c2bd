"""Domain exceptions of the cluster layer and their gRPC status codes, mapped in one place.

Policy code raises these; the gRPC interceptor (one per daemon) turns them into statuses with
`status_code_for(exc)` and `str(exc)` as the details, so handlers never pick codes themselves.
"""

from __future__ import annotations

import grpc

# The domain exceptions live in the engine (it raises them too); re-exported here for callers.
from ruyiflow.engine.errors import (  # noqa: E402
    HandoffError,
    InvalidRequest,
    ModelLoadError,
    ModelMismatch,
    NodeUnavailable,
    Overloaded,
    RuyiflowError,
)

__all__ = [
    "HandoffError",
    "PermissionDenied",
    "RetryLater",
    "Unauthenticated",
    "InvalidRequest",
    "ModelLoadError",
    "ModelMismatch",
    "NodeUnavailable",
    "Overloaded",
    "RuyiflowError",
    "STATUS_CODES",
    "TopologyError",
    "status_code_for",
]


class TopologyError(ValueError):
    """topology.yaml is invalid. The message names the field path and, when loaded from a file,
    the position (`file:line:column: path: problem`). Not a request error: it stops startup."""

    def __init__(self, message: str, path: str = "", position: str | None = None) -> None:
        self.problem = message
        self.path = path
        self.position = position
        where = ": ".join(p for p in (position, path) if p)
        super().__init__(f"{where}: {message}" if where else message)


class Unauthenticated(RuyiflowError):
    """The caller is not known: no client certificate, not a loopback peer, a missing or wrong
    cluster secret or API key."""


class PermissionDenied(RuyiflowError):
    """The caller is known but may not do this."""


class RetryLater(Overloaded):
    """Overloaded, with a hint of when to try again (seconds): sent as `retry-after-ms`
    trailing metadata over gRPC and the `Retry-After` header over HTTP."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


# The one table from domain errors to gRPC status codes (subclasses inherit their base's code).
STATUS_CODES: dict[type[RuyiflowError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NodeUnavailable: grpc.StatusCode.UNAVAILABLE,
    ModelLoadError: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """gRPC status code for `exc`: its domain code, else INTERNAL."""
    for cls in type(exc).__mro__:
        code = STATUS_CODES.get(cls)  # type: ignore[call-overload]
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


class PortInUse(OSError):
    """A daemon's listen or metrics address cannot be bound. One line for the operator: the
    topology field, the address, and the reason (usually: another process holds the port)."""

    def __init__(self, field: str, address: str, reason: str) -> None:
        self.field = field
        self.address = address
        super().__init__(f"{field}: cannot listen on {address}: {reason}")

    @classmethod
    def from_os_error(cls, exc: OSError, address: str, field: str) -> PortInUse:
        reason = exc.strerror or str(exc) or "address unavailable"
        return cls(field, address, reason.lower())
