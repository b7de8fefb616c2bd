"""Daemon plumbing shared by the router and the node daemons: a gRPC server with health,
reflection and the error-mapping interceptor; admission control for draining; channel options.

Shutdown pattern (every daemon), as `drain_and_stop(served, admission, grace)`:

    admission.begin_drain()                  # new calls -> NodeUnavailable -> UNAVAILABLE
    served.health.enter_graceful_shutdown()  # NOT_SERVING for good: balancers look elsewhere
    admission.wait_idle(grace)               # in-flight streams finish, within the grace period
    served.stop(1.0)                         # whatever is left is cancelled
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ruyiflow.cluster.errors import NodeUnavailable, PortInUse, RetryLater
from ruyiflow.cluster.grpc_errors import ErrorMappingInterceptor
from ruyiflow.cluster.tls import warn_if_exposed
from ruyiflow.proto import ruyiflow_pb2

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20  # handoff parts are <= 3 MiB; headers carry token lists
DEFAULT_MAX_WORKERS = 256  # a sync server holds one thread per open stream
RETRY_AFTER_S = 1.0  # the hint a full server gives
ServicerAdder = tuple[Callable[[Any, grpc.Server], None], Any]  # (add_XServicer_to_server, obj)


def service_name(short_name: str) -> str:
    """Full name of a ruyiflow service ("Router" -> "ruyiflow.v1.Router"), from the descriptor."""
    return ruyiflow_pb2.DESCRIPTOR.services_by_name[short_name].full_name


def message_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


KEEPALIVE_MS = 10_000  # a ping on every idle connection this often
KEEPALIVE_TIMEOUT_MS = 5_000  # no answer to a ping within this: the connection is dead


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options for channels between daemons: reconnect quickly, so a node that comes back is
    reachable within a poll or two (grpc's default backoff grows to two minutes), and send
    keepalive pings, so a peer that stopped answering (a hung or cut-off machine) breaks the
    calls on its connection instead of leaving them waiting."""
    return message_options(max_message_bytes) + [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.enable_retries", 0),  # the router decides about retries itself
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Server options: take the clients' keepalive pings (grpc's default answers pings more
    often than every 5 minutes with GOAWAY "too_many_pings")."""
    return message_options(max_message_bytes) + [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        # so_reuseport 0: a second daemon on a taken port must fail, not share it silently.
        ("grpc.so_reuseport", 0),
    ]


@dataclass(frozen=True)
class GrpcServer:
    """A started server; unpacks as `server, port, health = serve_grpc(...)`."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.server, self.port, self.health))

    def set_serving(self, is_serving: bool) -> None:
        """Health of the whole server ("") and of each named service."""
        status = health_pb2.HealthCheckResponse.SERVING
        if not is_serving:
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            self.health.set(name, status)

    def stop(self, grace: float | None) -> None:
        """Turn health NOT_SERVING for good, then stop; calls still running after `grace`
        seconds are cancelled. Blocks until the server has stopped."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def serve_grpc(
    servicers_adders: Sequence[ServicerAdder],
    address: str,
    health_service_names: Sequence[str],
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    *,
    max_workers: int = DEFAULT_MAX_WORKERS,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    field: str = "listen",
    credentials: grpc.ServerCredentials | None = None,
) -> GrpcServer:
    """Start a server on `address` (port 0 picks a free one) with the servicers, grpc.health.v1
    (NOT_SERVING until `set_serving(True)`), server reflection and the error interceptor.
    `field` names the topology entry of the address, for `PortInUse` when it cannot be bound.
    `credentials`: TLS (`cluster.tls`); without them a listener beyond loopback is warned of."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        interceptors=[ErrorMappingInterceptor(), *interceptors],
        options=server_options(max_message_bytes),
    )
    for add, servicer in servicers_adders:
        add(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(health_service_names)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if credentials is None:
            warn_if_exposed(address, field)
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:  # grpc says no more than that; a taken port is by far the usual cause
        raise PortInUse(field, address, "address already in use (or not available here)")
    served = GrpcServer(server, port, health_servicer, names)
    served.set_serving(False)
    server.start()
    return served


class Admission:
    """Counts in-flight calls and refuses new ones once draining began (thread-safe). With
    `max_tokens`, the calls in also share a token budget (`hold_tokens`)."""

    def __init__(
        self, what: str = "server", max_in_flight: int | None = None, max_tokens: int | None = None
    ) -> None:
        self._what = what
        self._max_in_flight = max_in_flight
        self._max_tokens = max_tokens
        self._num_tokens = 0
        self._cond = threading.Condition()
        self._num_in_flight = 0
        self._is_draining = False
        self._is_final = False  # a stopping daemon's drain, never undone

    @property
    def num_in_flight(self) -> int:
        return self._num_in_flight

    @property
    def is_draining(self) -> bool:
        return self._is_draining

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold a slot for one call; NodeUnavailable (UNAVAILABLE) while draining, RetryLater
        (RESOURCE_EXHAUSTED) when `max_in_flight` calls are already in."""
        with self._cond:
            if self._is_draining:
                raise NodeUnavailable(f"{self._what} is draining; retry on another instance")
            limit = self._max_in_flight
            if limit is not None and self._num_in_flight >= limit:
                raise RetryLater(
                    f"{self._what} is full ({limit} streams running or queued)", RETRY_AFTER_S
                )
            self._num_in_flight += 1
        try:
            yield
        finally:
            with self._cond:
                self._num_in_flight -= 1
                self._cond.notify_all()

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @contextlib.contextmanager
    def hold_tokens(self, num_tokens: int) -> Iterator[None]:
        """Hold `num_tokens` of the budget for an admitted call while it runs; RetryLater
        (RESOURCE_EXHAUSTED) when the calls in already hold `max_tokens` with them. A call
        alone is never refused here (the context limit bounds it)."""
        with self._cond:
            limit, held = self._max_tokens, self._num_tokens
            if limit is not None and held > 0 and held + num_tokens > limit:
                raise RetryLater(
                    f"{self._what} is full ({held} of {limit} tokens held; "
                    f"this request needs {num_tokens})",
                    RETRY_AFTER_S,
                )
            self._num_tokens += num_tokens
        try:
            yield
        finally:
            with self._cond:
                self._num_tokens -= num_tokens

    def begin_drain(self, final: bool = True) -> int:
        """Refuse new calls from now on; returns how many are in flight. `final=False`: an
        operator's drain, which `end_drain` can undo."""
        with self._cond:
            self._is_draining = True
            self._is_final = self._is_final or final
            return self._num_in_flight

    def end_drain(self) -> bool:
        """Admit calls again after an operator's drain; False if the daemon is stopping."""
        with self._cond:
            if self._is_final:
                return False
            self._is_draining = False
            return True

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no call is in flight; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._num_in_flight == 0, timeout)


def drain_and_stop(
    served: GrpcServer, admission: Admission, grace: float, stop_grace: float = 1.0
) -> bool:
    """The shutdown pattern of the module docstring; True if every admitted call finished
    within `grace` seconds (the rest are cancelled)."""
    admission.begin_drain()
    served.health.enter_graceful_shutdown()
    is_idle = admission.wait_idle(grace)
    served.stop(stop_grace if is_idle else 0.0)
    return is_idle
