"""Engines `ruyiflow up` starts from a node's `command:` are protected like its daemons: each
runs in its own process group (stopping `up` stops the engine and whatever it started), and it
dies with `up` even when `up` is SIGKILLed (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from ruyiflow.local_cluster import free_ports
from tests.security.test_supervisor import start_up as start_up_topology
from tests.security.test_supervisor import wait_for

# The engine starts a worker of its own (as vLLM does), records both pids and never answers.
ENGINE = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(sys.argv[1] + ".tmp", "w") as out:
    out.write(f"{__import__('os').getpid()} {worker.pid}")
__import__('os').rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""

TOPOLOGY = """
models:
  smollm2: {{path: smollm2}}
nodes:
  - name: cloud-engine
    tier: cloud
    listen: '127.0.0.1:{p[0]}'
    metrics: '127.0.0.1:{p[1]}'
    model: smollm2
    exits: [29]
    backend: openai
    base_url: 'http://127.0.0.1:{p[4]}/v1'
    served_model: smollm2
    command: ['{python}', '{engine}', '{pids}']
router:
  listen: '127.0.0.1:{p[2]}'
  metrics: '127.0.0.1:{p[3]}'
  http: ''
  thresholds: [{{exit: 29}}]
  grace_period_s: 1
"""


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def start_up(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    engine, pids = tmp_path / "engine.py", tmp_path / "engine.pids"
    engine.write_text(ENGINE)
    topology = tmp_path / "topology.yaml"
    topology.write_text(
        TOPOLOGY.format(p=free_ports(5), python=sys.executable, engine=engine, pids=pids)
    )
    proc, log = start_up_topology(topology)
    return proc, pids, log


def engine_pids(proc: subprocess.Popen, pids: Path, log: Path) -> tuple[int, int]:
    wait_for(lambda: pids.exists() or proc.poll() is not None, 60, "the engine to start")
    assert proc.poll() is None, log.read_text()
    engine, worker = (int(p) for p in pids.read_text().split())
    return engine, worker


def test_stopping_up_stops_the_engine_and_its_workers(tmp_path):
    proc, pids, log = start_up(tmp_path)
    try:
        engine, worker = engine_pids(proc, pids, log)
        assert os.getpgid(engine) == engine != os.getpgid(proc.pid)  # a group of its own
        assert os.getpgid(worker) == engine
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log.read_text()
        wait_for(lambda: not is_running(engine) and not is_running(worker), 10, "no engine left")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_engine_dies_with_a_sigkilled_up(tmp_path):
    proc, pids, log = start_up(tmp_path)
    try:
        engine, worker = engine_pids(proc, pids, log)
        proc.kill()  # no chance to clean up: the kernel kills the engine
        proc.wait(timeout=10)
        wait_for(lambda: not is_running(engine), 10, "the engine to die with up")
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in [*map(int, pids.read_text().split())] if pids.exists() else []:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
