"""One server interceptor that maps exceptions to gRPC statuses, for every ruyiflow daemon.

Handlers raise domain exceptions (`engine.errors.RuyiflowError` subclasses); the interceptor
aborts the call with `router.errors.status_code_for(exc)` and `str(exc)` as the details, so no
handler picks a status code itself. Anything else is a bug: it is logged with its traceback and
answered INTERNAL with a short message (no traceback leaves the process). A handler that already
set a status with `context.abort(...)` keeps it.

Works for all four RPC shapes: unary responses are wrapped in a function, streamed responses in a
generator, so an exception raised between two streamed messages is mapped too. Requests that do
not decode (garbage bytes, invalid UTF-8 in a string field) are answered INVALID_ARGUMENT here
too: the deserializer hands the handler an `Undecodable` marker instead of failing (grpc would
answer INTERNAL "Exception deserializing request!"), and the wrapper refuses it before any work.
grpc's own services (`/grpc.health.v1...`, `/grpc.reflection...`) are left untouched: health's
Watch relies on attributes of its handler function that a wrapper would hide.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ruyiflow.cluster.errors import status_code_for
from ruyiflow.engine.errors import InvalidRequest, RuyiflowError

log = logging.getLogger(__name__)

MAX_INTERNAL_DETAILS = 200  # INTERNAL details carry a hint, not a dump of internals
_UNWRAPPED_PREFIX = "/grpc."


class UpstreamStatus(Exception):
    """Answer the call with this exact status: passes a called service's error through (the
    router relaying a node's INVALID_ARGUMENT, say) without mapping it to a domain error."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Undecodable:
    """What a request deserializer returns for bytes that are not a valid message."""

    def __init__(self, exc: Exception) -> None:
        self.problem = " ".join(str(exc).split())[:MAX_INTERNAL_DETAILS]


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, and anything a parser raises
            return Undecodable(exc)

    return deserialize


def _check_decoded(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise InvalidRequest(f"request does not decode: {request.problem}")
    return request


def _checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    for request in requests:
        yield _check_decoded(request)


def internal_details(exc: BaseException) -> str:
    """Short, single-line details for an unexpected exception."""
    message = " ".join(str(exc).split())[:MAX_INTERNAL_DETAILS]
    return f"internal error: {type(exc).__name__}" + (f": {message}" if message else "")


def abort_for(exc: Exception, context: grpc.ServicerContext, method: str) -> None:
    """Abort `context` with the status `exc` maps to (always raises)."""
    if not context.is_active():
        # The client cancelled or the deadline passed (a health poll of a node still loading its
        # model): nobody reads the status, and nothing went wrong here. Aborting (rather than
        # re-raising) keeps grpc from logging the exception as an application error.
        log.debug("%s ended after its call did: %r", method, exc)
        context.abort(status_code_for(exc), str(exc))
    code = context.code() if hasattr(context, "code") else None
    if code is not None and code != grpc.StatusCode.OK:
        # The handler aborted on purpose (context.abort raises a bare Exception): keep its status.
        raise exc
    if isinstance(exc, UpstreamStatus):
        context.abort(exc.code, exc.details)
    if isinstance(exc, RuyiflowError):
        log.debug("%s refused: %s", method, exc)
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is not None:
            context.set_trailing_metadata((("retry-after-ms", str(round(retry_after_s * 1e3))),))
        context.abort(status_code_for(exc), str(exc))
    log.error("unhandled error in %s", method, exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, internal_details(exc))


def _wrap_unary(behavior: Callable[..., Any], method: str, is_stream: bool) -> Callable[..., Any]:
    @functools.wraps(behavior)
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behavior(_check_request(request, is_stream), context)
        except Exception as exc:
            abort_for(exc, context, method)

    return wrapper


def _check_request(request: Any, is_stream: bool) -> Any:
    """A unary request checked now; a request stream checked as each message is read."""
    return _checked_stream(request) if is_stream else _check_decoded(request)


def _wrap_stream(
    behavior: Callable[..., Iterator[Any]], method: str, is_stream: bool
) -> Callable[..., Any]:
    @functools.wraps(behavior)
    def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from behavior(_check_request(request, is_stream), context)
        except Exception as exc:
            abort_for(exc, context, method)

    return wrapper


def wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped by the exception mapping (any of the four shapes)."""
    serdes = {
        "request_deserializer": _tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        behavior = _wrap_unary(handler.unary_unary, method, False)
        return grpc.unary_unary_rpc_method_handler(behavior, **serdes)
    if handler.unary_stream is not None:
        behavior = _wrap_stream(handler.unary_stream, method, False)
        return grpc.unary_stream_rpc_method_handler(behavior, **serdes)
    if handler.stream_unary is not None:
        behavior = _wrap_unary(handler.stream_unary, method, True)
        return grpc.stream_unary_rpc_method_handler(behavior, **serdes)
    behavior = _wrap_stream(handler.stream_stream, method, True)
    return grpc.stream_stream_rpc_method_handler(behavior, **serdes)


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps exceptions raised by any handler to gRPC statuses (see the module docstring)."""

    def __init__(self) -> None:
        # method -> (handler, wrapped): servers hand back the same handler object per method, so
        # wrapping once keeps the per-call cost at a dict lookup.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNWRAPPED_PREFIX):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, wrap_handler(handler, method))
            self._wrapped[method] = cached
        return cached[1]
