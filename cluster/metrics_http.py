"""The Prometheus `/metrics` endpoint every daemon serves, and the histogram buckets router and
nodes share (so a dashboard can put their latencies side by side)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from ruyiflow.cluster.errors import PortInUse
from ruyiflow.cluster.tls import TlsFiles, warn_if_exposed
from ruyiflow.cluster.units import parse_address

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
INTER_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
BYTES_BUCKETS = tuple(float(4**k) for k in range(5, 16))  # 1 KiB .. 1 GiB


def serve_registry(
    address: str,
    registry: CollectorRegistry,
    field: str = "metrics",
    tls: TlsFiles | None = None,
    require_client_cert: bool = False,
) -> MetricsServer:
    """Serve a registry's `/metrics` on `host:port` in a daemon thread; `field` names the
    topology entry the address came from, for the error when the port is taken. With `tls`:
    HTTPS, and a client certificate from the cluster CA when `require_client_cert`."""
    host, port = parse_address(address, allow_zero=True)
    options: dict = {}
    if tls is None:
        warn_if_exposed(address, field)
    else:
        options = {
            "certfile": str(tls.cert),
            "keyfile": str(tls.key),
            "client_cafile": str(tls.ca),
            "client_auth_required": require_client_cert,
        }
    try:
        server, thread = start_http_server(port, addr=host, registry=registry, **options)
    except OSError as exc:
        raise PortInUse.from_os_error(exc, address, field) from None
    return MetricsServer(server, thread)


@dataclass
class MetricsServer:
    """A running `/metrics` HTTP server; `port` is the bound port (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
