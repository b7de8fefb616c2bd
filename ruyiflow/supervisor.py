"""The daemons `ruyiflow up` runs, kept up: each child is restarted when it dies (after a pause
that doubles, within a restart budget; each restart logged and counted in
`ruyiflow_up_restarts_total`), and no child outlives the supervisor.

Children never left behind:
- each runs in its own process group (a new session), so stopping kills the whole group,
  including whatever the daemon started itself;
- on Linux each asks the kernel for SIGKILL when its parent dies (`PR_SET_PDEATHSIG` through
  ctypes), so even a SIGKILL of `ruyiflow up` takes the children with it. The signal follows
  the *thread* that forked: children are spawned from the thread that supervises them.

Ports are checked before spawning: a port another process holds is reported with the
topology field, the address and, when /proc tells, the pid and command line holding it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge

from ruyiflow.cluster.errors import PortInUse
from ruyiflow.cluster.units import parse_address

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RestartPolicy:
    """At most `max_restarts` restarts of one child within `window_s`; the pause before a
    restart starts at `first_pause_s` and doubles with each recent restart."""

    max_restarts: int = 5
    window_s: float = 600.0
    first_pause_s: float = 1.0
    max_pause_s: float = 30.0

    def pause(self, num_recent: int) -> float:
        return min(self.max_pause_s, self.first_pause_s * 2**num_recent)


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec: SIGKILL when the parent goes away."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def spawn(argv: list[str], log_path: Path | None = None) -> subprocess.Popen:
    """Start `argv` in its own process group, killed when this process dies (Linux)."""
    out = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # noqa: SIM115 (the child holds it; closed below)
    parent = os.getpid()
    try:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),  # noqa: PLW1509 (no threads touched)
        )
    finally:
        if out is not None:
            out.close()


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Send `signum` to the child's whole process group (it may have children of its own)."""
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def port_holder(port: int) -> str | None:
    """'pid N (command)' of a local process listening on TCP `port`, when /proc tells."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{parts[9]}]")
    if not inodes:
        return None
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            if os.readlink(fd) not in inodes:
                continue
            pid = fd.parent.parent.name
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        return f"pid {pid} ({command.strip()[:120]})"
    return None


def check_ports(addresses: Mapping[str, str]) -> None:
    """PortInUse for the first of `addresses` (topology field -> host:port) that cannot be
    bound now, naming the process that holds it when possible."""
    for field_name, address in addresses.items():
        host, port = parse_address(address, allow_zero=True)
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                holder = port_holder(port)
                reason = (exc.strerror or "unavailable").lower()
                raise PortInUse(
                    field_name, address, reason + (f", held by {holder}" if holder else "")
                ) from None


@dataclass
class Child:
    """One supervised daemon: its command, log and the addresses it listens on."""

    name: str
    argv: list[str]
    addresses: dict[str, str]
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)  # monotonic times of restarts
    restart_at: float | None = None  # a restart is scheduled for then

    @property
    def listen(self) -> str:
        """The gRPC address (the first one)."""
        return next(iter(self.addresses.values()))

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    """Starts children, restarts the ones that die, stops them all."""

    def __init__(self, children: list[Child], policy: RestartPolicy | None = None) -> None:
        self.children = {c.name: c for c in children}
        self.policy = policy or RestartPolicy()
        self.registry = CollectorRegistry()
        self.restarts = Counter(
            "ruyiflow_up_restarts",
            "Daemons ruyiflow up restarted after they died",
            ["process"],
            registry=self.registry,
        )
        self.up = Gauge(
            "ruyiflow_up_process_running",
            "1 while the daemon's process runs",
            ["process"],
            registry=self.registry,
        )
        for name in self.children:
            self.restarts.labels(process=name)

    def start(self) -> None:
        """Check every port, then spawn every child."""
        check_ports({k: v for c in self.children.values() for k, v in c.addresses.items()})
        for child in self.children.values():
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.proc = spawn(child.argv, child.log_path)
        child.restart_at = None
        self.up.labels(process=child.name).set(1)

    def check(self, now: float | None = None) -> list[str]:
        """Restart what died (when its pause is over); returns the children that used up
        their restart budget (the caller gives up on the cluster)."""
        now = time.monotonic() if now is None else now
        given_up = []
        for child in self.children.values():
            if child.proc is None or child.is_alive():
                continue
            if child.restart_at is None:
                self.up.labels(process=child.name).set(0)
                recent = [t for t in child.restarts if now - t < self.policy.window_s]
                child.restarts = recent
                if len(recent) >= self.policy.max_restarts:
                    log.error(
                        "%s exited (code %s); %d restarts in %.0f s used up, giving up",
                        child.name,
                        child.proc.returncode,
                        len(recent),
                        self.policy.window_s,
                    )
                    given_up.append(child.name)
                    continue
                pause = self.policy.pause(len(recent))
                child.restart_at = now + pause
                log.warning(
                    "%s exited (code %s); restarting in %.1f s (restart %d of %d)",
                    child.name,
                    child.proc.returncode,
                    pause,
                    len(recent) + 1,
                    self.policy.max_restarts,
                )
            if now < child.restart_at:
                continue
            try:
                check_ports(child.addresses)
            except PortInUse as exc:
                child.restart_at = now + self.policy.pause(len(child.restarts))
                log.warning("%s not restarted yet: %s", child.name, exc)
                continue
            child.restarts.append(now)
            self.restarts.labels(process=child.name).inc()
            self._spawn(child)
            log.warning("%s restarted (pid %d)", child.name, child.proc.pid)
        return given_up

    def stop(self, grace: float) -> None:
        """SIGTERM every group, SIGKILL what is left after `grace` seconds."""
        running = [c.proc for c in self.children.values() if c.proc is not None]
        for proc in running:
            if proc.poll() is None:
                signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait()
            signal_group(proc, signal.SIGKILL)  # anything the daemon left in its group
        for name in self.children:
            self.up.labels(process=name).set(0)
