"""Domain exceptions shared by the engine, the nodes and the router.

Each maps to one gRPC status code in one place (`router/errors.py`), so servicers never choose
codes; the engine itself does not import grpc.
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
