"""Domain exceptions shared by the engine, the nodes and the router.

Each maps to one gRPC status code in one place (`STATUS_BY_ERROR`), so servicers never choose codes.
"""

from __future__ import annotations


class RuyiflowError(Exception):
    """Base of every error ruyiflow raises on purpose."""


class InvalidRequest(RuyiflowError, ValueError):
    """The caller asked for something malformed or impossible (bad exit, prompt too long, ...)."""


class ModelLoadError(RuyiflowError, ValueError):
    """A checkpoint, config or tokenizer file is missing, corrupt or unsupported."""


class ModelMismatch(RuyiflowError):
    """State or request made for other weights (fingerprint mismatch)."""


class HandoffError(InvalidRequest):
    """A handoff state failed validation (tampered, truncated, wrong shape/dtype/size)."""


class Overloaded(RuyiflowError):
    """No capacity right now; retry later or elsewhere."""


class NodeUnavailable(RuyiflowError):
    """The node is draining, stopping or not ready."""


# Names, not grpc objects, so the engine does not import grpc.
STATUS_BY_ERROR: dict[type[Exception], str] = {
    HandoffError: "INVALID_ARGUMENT",
    InvalidRequest: "INVALID_ARGUMENT",
    ModelLoadError: "FAILED_PRECONDITION",
    ModelMismatch: "FAILED_PRECONDITION",
    Overloaded: "RESOURCE_EXHAUSTED",
    NodeUnavailable: "UNAVAILABLE",
}


def status_name(exc: BaseException) -> str:
    """gRPC status code name for an exception (INTERNAL for anything unexpected)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return "INTERNAL"
