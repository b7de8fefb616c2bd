"""Daemon plumbing: the error interceptor on all four RPC shapes, serve_grpc's health and
reflection, and admission control for draining."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ruyiflow.cluster.errors import InvalidRequest, NodeUnavailable, Overloaded
from ruyiflow.cluster.grpc_errors import UpstreamStatus, internal_details
from ruyiflow.cluster.grpc_server import Admission, serve_grpc, service_name

SERVICE = "test.Echo"


def fail(kind: bytes, context: grpc.ServicerContext) -> None:
    if kind == b"invalid":
        raise InvalidRequest("prompt is empty")
    if kind == b"overloaded":
        raise Overloaded("queue full")
    if kind == b"boom":
        raise RuntimeError("kaput\nsecret internals")
    if kind == b"abort":
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "nope")
    if kind == b"upstream":
        raise UpstreamStatus(grpc.StatusCode.FAILED_PRECONDITION, "foreign fingerprint")
    if kind == b"late":  # answers after the caller's deadline, as a node still loading does
        deadline_passed = threading.Event()
        context.add_callback(deadline_passed.set)
        deadline_passed.wait(5)
        raise NodeUnavailable("node edge-0 is still loading its model")


def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    fail(request, context)
    return b"ok"


def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"first"
    fail(request, context)
    yield b"last"


def stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    for request in requests:
        fail(request, context)
    return b"ok"


def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for request in requests:
        yield b"echo"
        fail(request, context)


def add_echo(_servicer: object, server: grpc.Server) -> None:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture(scope="module")
def echo():
    served = serve_grpc([(add_echo, None)], "127.0.0.1:0", [SERVICE], max_workers=8)
    channel = grpc.insecure_channel(f"127.0.0.1:{served.port}")
    yield served, channel
    channel.close()
    served.stop(0)


def call(channel: grpc.Channel, shape: str, kind: bytes) -> list[bytes]:
    method = f"/{SERVICE}/{shape}"
    if shape == "Unary":
        return [channel.unary_unary(method)(kind, timeout=5)]
    if shape == "ServerStream":
        return list(channel.unary_stream(method)(kind, timeout=5))
    if shape == "StreamUnary":
        return [channel.stream_unary(method)(iter([b"fine", kind]), timeout=5)]
    return list(channel.stream_stream(method)(iter([b"fine", kind]), timeout=5))


SHAPES = ("Unary", "ServerStream", "StreamUnary", "Bidi")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("kind", "code", "details"),
    [
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        (b"overloaded", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
        (b"abort", grpc.StatusCode.PERMISSION_DENIED, "nope"),
        (b"upstream", grpc.StatusCode.FAILED_PRECONDITION, "foreign fingerprint"),
        (b"boom", grpc.StatusCode.INTERNAL, "internal error: RuntimeError: kaput secret internals"),
    ],
)
def test_exceptions_map_to_statuses(echo, shape, kind, code, details) -> None:
    _, channel = echo
    with pytest.raises(grpc.RpcError) as info:
        call(channel, shape, kind)
    assert info.value.code() == code
    assert info.value.details() == details


@pytest.mark.parametrize("shape", SHAPES)
def test_success_passes_through(echo, shape) -> None:
    _, channel = echo
    assert call(channel, shape, b"fine")[-1] in (b"ok", b"last", b"echo")


def test_unexpected_errors_are_logged_with_traceback(echo, caplog) -> None:
    _, channel = echo
    with caplog.at_level(logging.ERROR, logger="ruyiflow.cluster.grpc_errors"):
        with pytest.raises(grpc.RpcError):
            call(channel, "Unary", b"boom")
    assert any(r.exc_info and "Unary" in r.getMessage() for r in caplog.records)


def test_a_refusal_after_the_caller_left_logs_no_traceback(echo, caplog) -> None:
    """A health or Info probe that times out while the node is busy loading is an expected
    state: nothing at ERROR, from our interceptor or from grpc's server."""
    _, channel = echo
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(f"/{SERVICE}/Unary")(b"late", timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = threading.Event()
        deadline.wait(0.5)  # the handler finishes after the client gave up
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_internal_details_are_short() -> None:
    details = internal_details(ValueError("x" * 5000))
    assert details.startswith("internal error: ValueError: ") and len(details) < 300


def test_health_starts_not_serving_and_reflection_lists_services() -> None:
    served = serve_grpc([(add_echo, None)], "127.0.0.1:0", [SERVICE])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            server, port, health_servicer = served
            assert (server, port, health_servicer) == (served.server, served.port, served.health)
            served.set_serving(True)
            reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            answer = next(iter(stub.ServerReflectionInfo(iter([ask]), timeout=5)))
            names = {s.name for s in answer.list_services_response.service}
            assert {SERVICE, "grpc.health.v1.Health"} <= names
    finally:
        served.stop(0)


def test_taken_port_is_refused() -> None:
    served = serve_grpc([], "127.0.0.1:0", [])
    try:
        with pytest.raises(OSError):
            serve_grpc([], f"127.0.0.1:{served.port}", [])
    finally:
        served.stop(0)


def test_service_names_come_from_the_descriptor() -> None:
    assert service_name("Router") == "ruyiflow.v1.Router"
    assert service_name("Node") == "ruyiflow.v1.Node"


def test_admission_drains() -> None:
    admission = Admission("test")
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with admission.admit():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=hold)
    thread.start()
    assert entered.wait(5)
    assert admission.begin_drain() == 1
    with pytest.raises(NodeUnavailable, match="draining"):
        with admission.admit():
            pass
    assert not admission.wait_idle(0.05)
    release.set()
    assert admission.wait_idle(5)
    thread.join()
