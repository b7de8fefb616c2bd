"""Errors of the OpenAI HTTP front end, mapped to statuses in this one place.

Whatever a request raises reaches `error_answer(exc)`: refusals of the HTTP layer itself
(`ApiError`: unknown model, body too large), domain exceptions (through `status_code_for`, the
same table the gRPC interceptor uses), node statuses the router passes through (`UpstreamStatus`)
and request-body validation errors. gRPC codes map one-to-one to HTTP statuses below; anything
else is a bug, logged with its traceback and answered 500 with a one-line message.
"""

from __future__ import annotations

import logging

import grpc
from pydantic import ValidationError

from ruyiflow.cluster.errors import status_code_for
from ruyiflow.cluster.grpc_errors import UpstreamStatus, internal_details
from ruyiflow.cluster.openai_types import ErrorDetail, ErrorResponse
from ruyiflow.engine.errors import RuyiflowError

log = logging.getLogger(__name__)

# gRPC status -> (HTTP status, OpenAI error type). 401 is answered once API keys exist.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "invalid_request_error"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "server_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
    grpc.StatusCode.INTERNAL: (500, "server_error"),
    grpc.StatusCode.UNKNOWN: (500, "server_error"),
}
ERROR_CODES = {400: "invalid_request", 404: "not_found", 429: "overloaded", 503: "unavailable"}


class ApiError(Exception):
    """A refusal of the HTTP layer: `status` is HTTP's (404 unknown model, 413 too large);
    `param` names the offending request field, `code` is OpenAI's machine-readable code."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def invalid(message: str, param: str | None = None, code: str = "invalid_request") -> ApiError:
    """400 naming the field."""
    return ApiError(400, message, param, code)


def _validation_param(exc: ValidationError) -> tuple[str, str | None]:
    """One line and the field path (`messages.0.role`) of pydantic's first complaint."""
    first = exc.errors(include_url=False)[0]
    path = ".".join(str(p) for p in first["loc"]) or None
    return f"{path or 'body'}: {first['msg']}", path


def error_answer(exc: BaseException) -> tuple[int, ErrorResponse]:
    """The HTTP status and OpenAI error body for `exc`."""
    if isinstance(exc, ApiError):
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        detail = ErrorDetail(message=exc.message, type=kind, param=exc.param, code=exc.code)
        return exc.status, ErrorResponse(error=detail)
    if isinstance(exc, ValidationError):
        message, param = _validation_param(exc)
        return error_answer(invalid(message, param))
    if isinstance(exc, UpstreamStatus):
        code, message = exc.code, exc.details
    elif isinstance(exc, RuyiflowError):
        code, message = status_code_for(exc), str(exc)
    else:
        log.error("unhandled error in the OpenAI front end", exc_info=exc)
        code, message = grpc.StatusCode.INTERNAL, internal_details(exc)
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    error_code = ERROR_CODES.get(status, code.name.lower())
    return status, ErrorResponse(error=ErrorDetail(message=message, type=kind, code=error_code))
