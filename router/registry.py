"""The router's view of the nodes: one channel and stub per node, a background poller of health
and `Node.Info`, and the router's own in-flight accounting per node.

A node counts as healthy once a poll found it SERVING; `mark_failed` (a stream broke) makes it
unhealthy until a poll *started after the failure* succeeds, so a poll already under way cannot
undo the mark with stale news.

Node addresses may be DNS names (a pod, a headless service of a node pool): the poller resolves
them every `resolve_interval_s` and after a failure, and a changed answer gets the node a new
channel over the addresses found (`router.node_dns`); the old one is closed later, so streams
on it finish.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ruyiflow.cluster.access import ROUTER, dialer_for
from ruyiflow.cluster.grpc_server import channel_options, service_name
from ruyiflow.cluster.topology import NodeSpec, Topology
from ruyiflow.proto import ruyiflow_pb2 as pb
from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc
from ruyiflow.router.metrics import RouterMetrics
from ruyiflow.router.node_dns import Resolver, channel_target, dns_host, resolve
from ruyiflow.router.policy import NodeLoad

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 0.5
DEFAULT_RPC_TIMEOUT_S = 0.4  # shorter than the interval, so polls never pile up
DEFAULT_RESOLVE_INTERVAL_S = 5.0
RETIRED_CHANNEL_S = 600.0  # a replaced channel stays open this long for the streams on it
NODE_SERVICE = service_name("Node")
_SERVING = health_pb2.HealthCheckResponse.SERVING


class _ChannelPair:
    """A node's stream channel and its health-check channel, closed together."""

    def __init__(self, main: grpc.Channel, health: grpc.Channel) -> None:
        self.main, self.health = main, health

    def close(self) -> None:
        self.main.close()
        self.health.close()


@dataclass
class NodeState:
    """What the router knows about one node; mutated only under the registry's lock."""

    spec: NodeSpec
    channel: _ChannelPair
    stub: pb_grpc.NodeStub
    health_stub: health_pb2_grpc.HealthStub
    is_healthy: bool = False
    is_draining: bool = False
    info: pb.NodeInfo | None = None
    last_seen: float | None = None  # time.monotonic() of the last successful health check
    failed_at: float = float("-inf")
    num_failed_checks: int = 0  # consecutive failed health checks
    answered: tuple[float, bool] | None = None  # (when, whether) it last answered a probe
    num_in_flight: int = 0  # streams this router has open on the node
    num_outstanding_tokens: int = 0  # their prompt + max_tokens budgets
    ips: tuple[str, ...] = ()  # what the address resolved to (DNS names only)


class NodeRegistry:
    """Channels, stubs, health and load of every node of `topology` (thread-safe)."""

    def __init__(
        self,
        topology: Topology,
        metrics: RouterMetrics | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        rpc_timeout_s: float = DEFAULT_RPC_TIMEOUT_S,
        resolver: Resolver = resolve,
        resolve_interval_s: float = DEFAULT_RESOLVE_INTERVAL_S,
    ) -> None:
        self.topology = topology
        self._metrics = metrics
        self._interval = poll_interval_s
        self._timeout = rpc_timeout_s
        self._resolver = resolver
        self._resolve_interval = resolve_interval_s
        self._dialer = dialer_for(topology, ROUTER)
        self._resolved_at = time.monotonic()
        self._retired: list[tuple[grpc.Channel, float]] = []
        self._lock = threading.Condition()
        self._nodes: dict[str, NodeState] = {}
        for spec in topology.nodes:
            name = dns_host(spec.listen)
            ips = tuple(resolver(*name)) if name is not None else ()
            channel, stub, health_stub = self._connect(spec.listen, ips, spec.name)
            self._nodes[spec.name] = NodeState(spec, channel, stub, health_stub, ips=ips)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _connect(
        self, address: str, ips: tuple[str, ...], name: str
    ) -> tuple[_ChannelPair, pb_grpc.NodeStub, health_pb2_grpc.HealthStub]:
        target, extra = channel_target(address, list(ips))
        options = [*channel_options(), *extra]
        channel = self._dialer.channel(target, options, peer=name)
        # Health checks on a connection of their own: a connection busy with streams (flow
        # control, a long queue of frames) never delays them.
        health = self._dialer.channel(
            target, [*options, ("grpc.use_local_subchannel_pool", 1)], peer=name
        )
        pair = _ChannelPair(channel, health)
        return pair, pb_grpc.NodeStub(channel), health_pb2_grpc.HealthStub(health)

    def resolve_names(self) -> list[str]:
        """Resolve every node named by DNS; nodes whose addresses changed get a new channel.
        Returns their names. An empty answer keeps the old channel (DNS may be flapping)."""
        changed, now = [], time.monotonic()
        for name, node in list(self._nodes.items()):
            host = dns_host(node.spec.listen)
            ips = tuple(self._resolver(*host)) if host is not None else ()
            if not ips or ips == node.ips:
                continue
            channel, stub, health_stub = self._connect(node.spec.listen, ips, name)
            with self._lock:
                self._retired.append((node.channel, now + RETIRED_CHANNEL_S))
                node.channel, node.stub, node.health_stub, node.ips = (
                    channel, stub, health_stub, ips,
                )  # fmt: skip
            log.info("node %s (%s) now at %s", name, node.spec.listen, ", ".join(ips))
            changed.append(name)
        with self._lock:
            keep = [(c, t) for c, t in self._retired if t > now]
            expired = [c for c, t in self._retired if t <= now]
            self._retired = keep
        for channel in expired:
            channel.close()
        self._resolved_at = now
        return changed

    def start(self) -> NodeRegistry:
        """Poll once now, then every interval in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="node-poller", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            if started - self._resolved_at >= self._resolve_interval:
                self.resolve_names()
            self.poll_once()
            self._stop.wait(max(0.0, self._interval - (time.monotonic() - started)))

    def poll_once(self) -> None:
        """Check every node concurrently (health, then Info) and record the answers."""
        started = time.monotonic()
        checks = {
            name: node.health_stub.Check.future(
                health_pb2.HealthCheckRequest(service=NODE_SERVICE), timeout=self._timeout
            )
            for name, node in self._nodes.items()
        }
        infos = {
            name: node.stub.Info.future(pb.InfoRequest(), timeout=self._timeout)
            for name, node in self._nodes.items()
        }
        for name, node in self._nodes.items():
            answer = self._is_serving(node, checks[name])
            try:
                info = infos[name].result() if answer else None
            except grpc.RpcError as exc:  # a slow Info keeps the last one; health decides
                log.debug("Info of %s failed: %s", name, exc.code())
                info = None
            self._record(node, started, answer, info)

    def _is_serving(self, node: NodeState, check: grpc.Future) -> bool | None:
        """The node's answer (SERVING or not; a refused connection is a no), None when it
        did not answer in time (slow, or hung: only failures in a row take it down)."""
        try:
            return check.result().status == _SERVING
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                return False
        # A node that registers only the server-wide status ("") is judged by that.
        try:
            reply = node.health_stub.Check(health_pb2.HealthCheckRequest(), timeout=self._timeout)
        except grpc.RpcError as exc:
            return None if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else False
        return reply.status == _SERVING

    def _record(
        self, node: NodeState, started: float, answer: bool | None, info: pb.NodeInfo | None
    ) -> None:
        """Record one poll: `answer` None (no answer) counts toward the failures in a row
        that take a node down; an explicit NOT_SERVING takes it down at once."""
        is_serving = bool(answer)
        with self._lock:
            if is_serving and started < node.failed_at:
                return  # stale good news from before a failure; the next poll decides
            was_healthy = node.is_healthy
            node.num_failed_checks = 0 if is_serving else node.num_failed_checks + 1
            # Down only after `health_failures` failed checks in a row: one slow answer from
            # a busy node is not an outage (a broken stream marks it down at once).
            is_down = node.num_failed_checks >= self.topology.router.health_failures
            node.is_healthy = is_serving or (answer is None and was_healthy and not is_down)
            if info is not None:
                node.info = info
                node.is_draining = info.draining
                node.last_seen = time.monotonic()
            self._lock.notify_all()
        if was_healthy != node.is_healthy:
            log.info("node %s is %s", node.spec.name, "up" if node.is_healthy else "down")
        if self._metrics is not None:
            self._metrics.set_node_up(node.spec.name, node.is_healthy)

    def is_answering(self, name: str, timeout: float = 0.5) -> bool:
        """Whether `name` answers a health check now (on its health connection); answers are
        shared for `timeout` seconds, so many idle streams on one node cost one check."""
        with self._lock:
            node = self._nodes[name]
            cached = node.answered
        now = time.monotonic()
        if cached is not None and now - cached[0] < timeout:
            return cached[1]
        try:
            request = health_pb2.HealthCheckRequest()
            node.health_stub.Check(request, timeout=timeout)
            answered = True
        except grpc.RpcError as exc:
            answered = exc.code() not in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,
            )
        with self._lock:
            node.answered = (time.monotonic(), answered)
        return answered

    def mark_failed(self, name: str) -> None:
        """A stream to `name` broke: unhealthy until a later poll finds it serving."""
        with self._lock:
            node = self._nodes[name]
            node.is_healthy = False
            node.failed_at = time.monotonic()
            if node.ips:  # a pod may have moved: look its name up again at the next poll
                self._resolved_at = float("-inf")
        if self._metrics is not None:
            self._metrics.set_node_up(name, False)

    def wait_ready(self, timeout: float, names: Sequence[str] | None = None) -> bool:
        """Wait until every node (or those named) is healthy; False on timeout."""
        wanted = [self._nodes[n] for n in (names if names is not None else self._nodes)]
        with self._lock:
            return self._lock.wait_for(lambda: all(n.is_healthy for n in wanted), timeout)

    def loads(self, candidates: Sequence[str]) -> list[NodeLoad]:
        """Load of each candidate: the node's last report combined with this router's own
        streams. The report lags by up to a poll and the router's count misses other routers'
        traffic, so each field takes the larger of the two (adding them would count the
        router's streams twice once the node reports them)."""
        out = []
        with self._lock:
            for name in candidates:
                node = self._nodes[name]
                load = node.info.load if node.info is not None else pb.Load()
                out.append(
                    NodeLoad(
                        name=name,
                        healthy=node.is_healthy,
                        draining=node.is_draining,
                        running=max(load.running, node.num_in_flight),
                        queued=load.queued,
                        outstanding_tokens=max(
                            load.outstanding_tokens, node.num_outstanding_tokens
                        ),
                        capacity=node.spec.max_streams,
                        batch=node.spec.max_batch,
                        streams=max(load.running + load.queued, node.num_in_flight),
                    )
                )
        return out

    def acquire(self, name: str, num_tokens: int) -> None:
        """Count one router stream of `num_tokens` budgeted tokens on `name` (see `loads`)."""
        with self._lock:
            node = self._nodes[name]
            node.num_in_flight += 1
            node.num_outstanding_tokens += num_tokens

    def release(self, name: str, num_tokens: int) -> None:
        """Undo one `acquire`."""
        with self._lock:
            node = self._nodes[name]
            node.num_in_flight -= 1
            node.num_outstanding_tokens -= num_tokens

    def stub(self, name: str) -> pb_grpc.NodeStub:
        return self._nodes[name].stub

    def spec(self, name: str) -> NodeSpec:
        return self._nodes[name].spec

    def info(self, name: str) -> pb.NodeInfo | None:
        with self._lock:
            return self._nodes[name].info

    def is_available(self, name: str) -> bool:
        with self._lock:
            node = self._nodes[name]
            return node.is_healthy and not node.is_draining

    def statuses(self) -> list[pb.NodeStatus]:
        """Every node in topology order, as `ListNodes` reports it."""
        now = time.monotonic()
        out = []
        with self._lock:
            for node in self._nodes.values():
                status = pb.NodeStatus(
                    name=node.spec.name, address=node.spec.listen, healthy=node.is_healthy
                )
                if node.info is not None:
                    status.info.CopyFrom(node.info)
                if node.last_seen is not None:
                    status.last_seen_ms_ago = (now - node.last_seen) * 1000.0
                out.append(status)
        return out

    def close(self) -> None:
        """Stop polling and close every channel."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for node in self._nodes.values():
            node.channel.close()
        for channel, _ in self._retired:
            channel.close()
