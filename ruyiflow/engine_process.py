"""External engines `ruyiflow up` runs for nodes with a `command:` (e.g. a llama.cpp server):
start each before the nodes, tell when its `/v1/models` answers, restart it when it dies
(with a growing pause, up to `MAX_RESTARTS` times), and stop it last. While an engine is down
its node is NOT_SERVING and the router serves elsewhere; once it answers again, the node
serves again.

Engines are protected like the daemons (`ruyiflow.supervisor.spawn`): each runs in its own
process group, stopped as a group (SIGTERM, then SIGKILL after the grace), and asks the kernel
for SIGKILL when `up` dies, even by SIGKILL. That signal follows the thread that spawned the
engine, so a restart happens under the supervisor's lock and `stop` stops the engines before
that thread ends."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ruyiflow.cluster.topology import Topology
from ruyiflow.supervisor import signal_group, spawn

MAX_RESTARTS = 5
RESTART_PAUSE_S = 1.0  # doubled after each restart
SUPERVISE_INTERVAL_S = 0.5


@dataclass
class EngineProcess:
    """One engine a node of the topology names in `command:`."""

    node: str
    argv: tuple[str, ...]
    base_url: str
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    num_restarts: int = 0
    _next_start: float = field(default=0.0, repr=False)

    @property
    def name(self) -> str:
        return f"{self.node}.engine"

    def start(self) -> None:
        self.proc = spawn(list(self.argv), self.log_path)

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_answering(self, timeout: float = 1.0) -> bool:
        """Its `/v1/models` answers 200 (direct connection: no proxy for a local engine)."""
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(self.base_url.rstrip("/") + "/models", timeout=timeout) as reply:
                return reply.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def supervise(self) -> str | None:
        """Restart the engine if it died (after a pause); returns a line to report, if any."""
        if self.proc is None or self.proc.poll() is None:
            return None
        now = time.monotonic()
        if self.num_restarts >= MAX_RESTARTS:
            return None
        if self._next_start == 0.0:
            self._next_start = now + RESTART_PAUSE_S * 2**self.num_restarts
            return f"engine of {self.node} exited (code {self.proc.returncode}); restarting"
        if now < self._next_start:
            return None
        self.num_restarts += 1
        self._next_start = 0.0
        self.start()
        return f"engine of {self.node} restarted ({self.num_restarts}/{MAX_RESTARTS})"

    def stop(self, grace: float) -> None:
        """SIGTERM the engine's process group, SIGKILL after `grace` seconds; then SIGKILL
        whatever the engine left in its group (workers it started)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            signal_group(self.proc, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                signal_group(self.proc, signal.SIGKILL)
                self.proc.wait()
        signal_group(self.proc, signal.SIGKILL)


def expand_argv(argv: tuple[str, ...]) -> tuple[str, ...]:
    """`command:` with its placeholders filled: `{python}` is this interpreter (the one
    ruyiflow runs in, where the `engines` extra installs llama.cpp's server) and
    `{smollm2_gguf}` the embedded model's GGUF file."""
    values = {"python": sys.executable}
    if any("{smollm2_gguf}" in a for a in argv):
        from ruyiflow.engine.checkpoint import embedded_gguf_path

        values["smollm2_gguf"] = str(embedded_gguf_path())
    return tuple(a.format(**values) if "{" in a else a for a in argv)


def engine_processes(topology: Topology, log_dir: Path | None = None) -> list[EngineProcess]:
    """The engines of `topology`'s nodes that have a `command:`."""
    return [
        EngineProcess(
            n.name,
            expand_argv(n.command),
            n.base_url or "",
            log_dir / f"{n.name}.engine.log" if log_dir is not None else None,
        )
        for n in topology.nodes
        if n.command
    ]


class EngineSupervisor:
    """A thread that keeps the engines running until `stop`."""

    def __init__(self, engines: list[EngineProcess], quiet: bool = False) -> None:
        self.engines = engines
        self.quiet = quiet
        self._stop = threading.Event()
        self._lock = threading.Lock()  # no restart while `stop` runs
        self._thread = threading.Thread(target=self._run, name="engines", daemon=True)

    def start(self) -> None:
        for engine in self.engines:
            engine.start()
        if self.engines:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SUPERVISE_INTERVAL_S):
            with self._lock:
                if self._stop.is_set():
                    return
                for engine in self.engines:
                    line = engine.supervise()
                    if line and not self.quiet:
                        print(f"[up] {line}", file=sys.stderr, flush=True)

    def stop(self, grace: float) -> None:
        """Stop every engine, then the thread (an engine it restarted dies with it)."""
        self._stop.set()
        with self._lock:
            deadline = time.monotonic() + grace
            for engine in self.engines:
                engine.stop(max(0.1, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._thread.join(timeout=5)
