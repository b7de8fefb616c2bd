"""Who may call a node: the server side (an interceptor that authenticates every Node method but
health) and the client side (channels that present the caller).

A caller is one of the topology's identities: `router`, a node's name, or `operator` (the
`ruyiflow drain` command). How it is known:

| transport                 | accepted callers                                               |
|---------------------------|----------------------------------------------------------------|
| mTLS (`tls:` in topology) | a client certificate from the cluster CA naming an identity    |
| plaintext, loopback peer  | anyone on this machine (`local`, or the identity it claims)    |
| plaintext, other peers    | callers presenting the cluster secret ($RUYIFLOW_CLUSTER_SECRET) |

Anything else is UNAUTHENTICATED. Each method then takes only some identities
(`NODE_METHOD_CALLERS`): moving states and draining are the router's, pushing a state in is a
peer node's. Secrets and keys are compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from ruyiflow.cluster.errors import PermissionDenied, Unauthenticated
from ruyiflow.cluster.tls import TlsFiles, channel_credentials, tls_files

CLUSTER_SECRET_ENV = "RUYIFLOW_CLUSTER_SECRET"
SECRET_KEY = "ruyiflow-cluster-secret"
CALLER_KEY = "ruyiflow-caller"
ROUTER = "router"
OPERATOR = "operator"
LOCAL = "local"  # a loopback peer that claimed nothing: this machine's operator
NODE_SERVICE_PREFIX = "/ruyiflow.v1.Node/"


def _routers_and(*names: str) -> frozenset[str]:
    return frozenset({ROUTER, LOCAL, *names})


# Node method -> identities allowed (None: any member; "*node" stands for every node's name).
NODE_METHOD_CALLERS: dict[str, frozenset[str] | None] = {
    "Generate": None,  # prefix_text / prefix_token_ids: the router's only (checked by the node)
    "Info": None,
    "Resume": _routers_and(),
    "PushState": _routers_and(),
    "FetchState": _routers_and(),
    "Drain": _routers_and(OPERATOR),
    "AcceptState": frozenset({LOCAL, "*node"}),
}


@dataclass(frozen=True)
class Caller:
    name: str  # router, a node name, operator, or local
    how: str  # tls | loopback | secret

    @property
    def is_router(self) -> bool:
        return self.name in (ROUTER, LOCAL)


def cluster_secret() -> bytes | None:
    """The shared secret of plaintext clusters, from the environment (None: not set)."""
    value = os.environ.get(CLUSTER_SECRET_ENV, "")
    return value.encode() if value else None


def is_loopback_peer(peer: str) -> bool:
    """`context.peer()` ("ipv4:127.0.0.1:5123", "ipv6:[::1]:5123", "unix:...") is this host."""
    kind, _, rest = peer.partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def tls_identity(context: grpc.ServicerContext) -> str | None:
    """The identity of a verified client certificate: its common name ("edge-0"); None
    without one (grpc puts only verified peers' names in the auth context)."""
    auth = context.auth_context() or {}
    for name in auth.get("x509_common_name") or []:
        text = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        if text:
            return text
    return None


def _metadata(context: grpc.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key:
            value = item.value
            return value.decode(errors="replace") if isinstance(value, bytes) else value
    return None


def secret_matches(given: str | None, secret: bytes) -> bool:
    """Constant-time comparison of a presented secret."""
    return given is not None and hmac.compare_digest(given.encode(), secret)


class AccessPolicy:
    """Authenticates callers of one node (see the module docstring)."""

    def __init__(
        self, members: Iterable[str], secret: bytes | None = None, use_tls: bool = False
    ) -> None:
        self.nodes = frozenset(members) - {ROUTER, OPERATOR}
        self.members = self.nodes | {ROUTER, OPERATOR}
        self.secret = secret
        self.use_tls = use_tls

    def caller(self, context: grpc.ServicerContext) -> Caller:
        if self.use_tls:
            name = tls_identity(context)
            if name is None:
                raise Unauthenticated("a client certificate from the cluster CA is required")
            if name not in self.members:
                raise PermissionDenied(f"certificate identity {name!r} is not in the topology")
            return Caller(name, "tls")
        claimed = _metadata(context, CALLER_KEY)
        if claimed is not None and claimed not in self.members:
            raise PermissionDenied(f"caller {claimed[:64]!r} is not in the topology")
        if is_loopback_peer(context.peer()):
            return Caller(claimed or LOCAL, "loopback")
        if self.secret is not None and secret_matches(_metadata(context, SECRET_KEY), self.secret):
            if claimed is None:
                raise Unauthenticated(f"say who calls in the {CALLER_KEY!r} metadata")
            return Caller(claimed, "secret")
        raise Unauthenticated(
            "node methods answer loopback peers, callers with the cluster secret "
            f"(${CLUSTER_SECRET_ENV}) or, with tls in the topology, cluster certificates"
        )

    def check(self, method: str, context: grpc.ServicerContext) -> Caller:
        """The caller, if it may call `method` (a Node method's short name)."""
        caller = self.caller(context)
        allowed = NODE_METHOD_CALLERS.get(method)
        if allowed is None:
            return caller
        is_node = "*node" in allowed and caller.name in self.nodes
        if caller.name not in allowed and not is_node:
            raise PermissionDenied(f"{caller.name} may not call {method}")
        return caller


def _checked(behavior: Callable[..., Any], check: Callable[[Any], object]) -> Callable[..., Any]:
    def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
        check(context)
        return behavior(request, context)

    return wrapper


class MethodGuard(grpc.ServerInterceptor):
    """Runs `check(method_short_name, context)` before every method of the service whose
    methods start with `prefix`; other services (health, reflection) stay open. `check`
    raises a domain error (Unauthenticated, PermissionDenied) to refuse."""

    def __init__(self, prefix: str, check: Callable[[str, grpc.ServicerContext], object]) -> None:
        self.prefix = prefix
        self._check = check
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefix):
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(handler, method[len(self.prefix) :]))
            self._wrapped[method] = cached
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler, name: str) -> grpc.RpcMethodHandler:
        def check(context: grpc.ServicerContext) -> None:
            self._check(name, context)

        serdes = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        for shape, make in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        ):
            behavior = getattr(handler, shape)
            if behavior is not None:
                return make(_checked(behavior, check), **serdes)
        return handler


def AccessInterceptor(policy: AccessPolicy) -> MethodGuard:  # noqa: N802 (reads as a class)
    """The guard of the Node service: `policy.check` before every Node method."""
    return MethodGuard(NODE_SERVICE_PREFIX, policy.check)


class _CallerMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds who calls (and the cluster secret, when set) to every call of a channel."""

    def __init__(self, metadata: Mapping[str, str]) -> None:
        self._metadata = tuple(metadata.items())

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            (*(details.metadata or ()), *self._metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str], ...] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: Any


def present_caller(
    channel: grpc.Channel, name: str, secret: bytes | None = None, use_tls: bool = False
) -> grpc.Channel:
    """`channel` with every call saying it comes from `name` and, on plaintext channels,
    carrying the cluster secret when one is set (under mTLS the certificate says who calls)."""
    metadata = {CALLER_KEY: name}
    if secret is not None and not use_tls:
        metadata[SECRET_KEY] = secret.decode()
    return grpc.intercept_channel(channel, _CallerMetadata(metadata))


@dataclass(frozen=True)
class Dialer:
    """How one process of the cluster opens channels to the others: as `name`, over mTLS
    with its certificate when `tls` is set, else in plaintext with the cluster secret."""

    name: str
    secret: bytes | None = None
    tls: TlsFiles | None = None

    def channel(
        self, target: str, options: Iterable[tuple[str, Any]] = (), peer: str | None = None
    ) -> grpc.Channel:
        """A channel to `target`; under mTLS the server must prove it is `peer` (its name in
        the topology; None: the target's host)."""
        options = list(options)
        if self.tls is None:
            channel = grpc.insecure_channel(target, options=options)
        else:
            if peer is not None:
                options.append(("grpc.ssl_target_name_override", peer))
            channel = grpc.secure_channel(target, channel_credentials(self.tls), options=options)
        return present_caller(channel, self.name, self.secret, use_tls=self.tls is not None)


def node_security(topology: Any, name: str) -> tuple[AccessPolicy, Dialer, dict[str, str]]:
    """What node `name` of `topology` needs: the policy for its callers (topology identities
    by certificate under mTLS), its dialer (for pushes) and the addresses it may push to
    (every other node's listen address, with that node's name)."""
    names = [n.name for n in topology.nodes]
    secret = cluster_secret()
    peers = {n.listen: n.name for n in topology.nodes if n.name != name}
    policy = AccessPolicy(names, secret, use_tls=topology.tls is not None)
    return policy, dialer_for(topology, name), peers


def dialer_for(topology: Any, name: str) -> Dialer:
    """The dialer of process `name` (router, a node, operator) of `topology`."""
    return Dialer(name, cluster_secret(), tls_files(topology, name))
