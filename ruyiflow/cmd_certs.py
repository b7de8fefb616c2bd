"""`ruyiflow certs --out DIR --topology FILE`: a development CA and one certificate per process
of the topology (the router, every node, and `operator` for the command line), so a topology
with `tls: {dir: DIR}` runs over mTLS with one extra command. Production clusters bring their
own CA; the layout (`cluster.tls`) is what matters.

Each certificate: common name = the process's name (the identity nodes check), DNS names = the
name itself (what callers verify), `localhost` and the hosts of its listen addresses; EC P-256
keys, written 0600. An existing CA in DIR is reused, so certificates can be added later.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

DAYS = 365


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for ca.pem, <name>.pem, <name>-key.pem")
    p.add_argument("--topology", default="topology.yaml")
    p.add_argument("--days", type=int, default=DAYS, help="validity of the certificates")


def _write_key(path: Path, key) -> None:  # noqa: ANN001
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _load_or_make_ca(out: Path, days: int):  # noqa: ANN202
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = out / "ca.pem", out / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ruyiflow development CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return cert, key


def issue(out: Path, name: str, hosts: list[str], ca_cert, ca_key, days: int) -> None:  # noqa: ANN001
    """Write `<name>.pem` and `<name>-key.pem` signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from ruyiflow.cluster.tls import cert_paths

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost")]
    seen = {name, "localhost"}
    for host in ["127.0.0.1", "::1", *hosts]:
        if host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = cert_paths(out, name)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)


def make_certs(topology_path: str | Path, out: str | Path, days: int = DAYS) -> list[str]:
    """A CA (reused if `out` has one) and a certificate per process; returns their names."""
    from ruyiflow.cluster.topology_yaml import load_topology
    from ruyiflow.cluster.units import parse_address

    topology = load_topology(topology_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _load_or_make_ca(out, days)

    def hosts(*addresses: str) -> list[str]:
        return [parse_address(a, allow_zero=True)[0] for a in addresses if a]

    router = topology.router
    replicas = [a for r in router.replicas for a in (r.listen, r.metrics, r.http)]
    router_hosts = hosts(router.listen, router.metrics, router.http, *replicas)
    processes = {"router": list(dict.fromkeys(router_hosts)), "operator": []}
    for node in topology.nodes:
        processes[node.name] = hosts(node.listen, node.metrics)
    for name, names in processes.items():
        issue(out, name, names, ca_cert, ca_key, days)
    return list(processes)


def run(args: argparse.Namespace) -> int:
    names = make_certs(args.topology, args.out, args.days)
    print(f"wrote ca.pem and certificates for {', '.join(names)} to {args.out}")
    print("point the topology at them with:  tls: {dir: " + str(args.out) + "}", file=sys.stderr)
    return 0
