"""uvicorn serving the router's OpenAI-compatible API from a thread of the router daemon.

The socket is bound here, before the thread starts, so a taken port fails `start()` with one
line naming the topology field (`PortInUse`), as the gRPC and metrics servers do, and port 0
reports the port it got.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

import uvicorn
from starlette.types import ASGIApp

from ruyiflow.cluster.errors import PortInUse
from ruyiflow.cluster.tls import TlsFiles, warn_if_exposed
from ruyiflow.cluster.units import parse_address

START_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 30  # idle client connections stay open this long (OpenAI clients reuse them)


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Its protocol is IPPROTO_TCP, not 0 as `socket.create_server`
    makes it: asyncio turns Nagle off only on such sockets (and their accepted connections),
    and with Nagle on, a stream's first event waits ~40 ms for the ACK of the headers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """A running HTTP server for `app` on `address` (`host:port`, port 0 picks one)."""

    def __init__(
        self,
        app: ASGIApp,
        address: str,
        field: str = "router.http",
        grace_s: float = 1.0,
        tls: TlsFiles | None = None,
        require_client_cert: bool = False,
    ) -> None:
        host, port = parse_address(address, allow_zero=True)
        ssl_options: dict = {}
        if tls is None:
            warn_if_exposed(address, field)
        else:  # HTTPS; with require_client_cert, clients show a certificate of the cluster CA
            ssl_options = {
                "ssl_certfile": str(tls.cert),
                "ssl_keyfile": str(tls.key),
                "ssl_ca_certs": str(tls.ca),
                "ssl_cert_reqs": ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE,
            }
        try:
            self._socket = _listen(host, port)
        except OSError as exc:
            raise PortInUse.from_os_error(exc, address, field) from None
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=max(1, round(grace_s)),
            **ssl_options,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self) -> HttpServer:
        """Serve from a daemon thread; returns once uvicorn accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._socket.close()
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        """Close the listener and idle connections; open responses get the grace period."""
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()
