"""TLS material of one process of the cluster (`tls:` in the topology) and the gRPC credentials
made from it, plus the warning for a plaintext listener beyond loopback.

Every certificate is signed by the cluster CA and names its process twice: the common name is
the identity nodes check (`cluster.access`), and a DNS subject alternative name of the same
name is what a caller verifies - channels set the expected name (`ssl_target_name_override`)
to the peer's name from the topology, so a node answers only as itself whatever address it is
reached at.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ruyiflow.cluster.units import parse_address

log = logging.getLogger(__name__)
CA_FILE = "ca.pem"


@dataclass(frozen=True)
class TlsFiles:
    """The CA certificate and one process's certificate and key (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert, key) bytes; a missing file names the path and how to make it."""
        try:
            return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"TLS file {exc.filename} is missing; make the cluster's certificates with "
                "`ruyiflow certs --out DIR --topology FILE`"
            ) from None


def cert_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """(certificate, key) of process `name` in `directory`."""
    return directory / f"{name}.pem", directory / f"{name}-key.pem"


def tls_dir(topology: Any) -> Path | None:
    """The certificate directory of `topology` (relative to its file), None without TLS."""
    if topology.tls is None:
        return None
    directory = Path(topology.tls.dir).expanduser()
    if not directory.is_absolute():
        directory = Path(topology.source).parent / directory
    return directory


def tls_files(topology: Any, name: str) -> TlsFiles | None:
    """Process `name`'s TLS files, None when the topology has no `tls:` block."""
    directory = tls_dir(topology)
    if directory is None:
        return None
    cert, key = cert_paths(directory, name)
    return TlsFiles(directory / CA_FILE, cert, key)


def server_credentials(files: TlsFiles, require_client_cert: bool) -> grpc.ServerCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=require_client_cert
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(address: str, what: str) -> bool:
    """Log a warning when `address` listens beyond loopback in plaintext; True if it does."""
    host = parse_address(address, allow_zero=True)[0]
    if is_loopback_host(host):
        return False
    log.warning(
        "%s listens on %s without TLS: anyone who can reach it can use it and read its traffic "
        "(add a tls: block to the topology; `ruyiflow certs` makes the certificates)",
        what,
        address,
    )
    return True
