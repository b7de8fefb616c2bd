"""`ruyiflow up` as an operator runs it (a subprocess): a taken port is named before anything
starts, SIGTERM during start-up stops everything, a daemon that dies is restarted and counted,
and a SIGKILL of `up` itself leaves no child behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ruyiflow.cmd_up import health
from ruyiflow.local_cluster import free_ports
from ruyiflow.supervisor import RestartPolicy, port_holder

TOPOLOGY = """
models:
  smollm2: {{path: smollm2, extra_exits: [12, 16, 20, 24]}}
nodes:
  - {{name: node-0, tier: cloud, listen: '127.0.0.1:{p[0]}', metrics: '127.0.0.1:{p[1]}',
      model: smollm2, exits: [12, 16, 20, 24, 29], max_batch: 4, max_context: 1024}}
router:
  listen: '127.0.0.1:{p[2]}'
  metrics: '127.0.0.1:{p[3]}'
  http: ''
  thresholds:
    - {{below: 0.5, exit: 12}}
    - {{exit: 29}}
  grace_period_s: 1
"""


def write(tmp_path: Path) -> tuple[Path, list[int]]:
    ports = free_ports(5)
    path = tmp_path / "topology.yaml"
    path.write_text(TOPOLOGY.format(p=ports))
    return path, ports


def start_up(topology: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    log = topology.parent / "up.log"
    argv = [sys.executable, "-m", "ruyiflow", "up", "--topology", str(topology), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=topology.parent)
    return proc, log


def children_of_topology(topology: Path) -> list[int]:
    """Pids of processes whose command line names this (unique) topology file."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(topology) in text and " up " not in text:
            found.append(int(cmdline.parent.name))
    return found


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_restart_policy_pauses_grow_to_a_cap():
    policy = RestartPolicy(first_pause_s=1, max_pause_s=5)
    assert [policy.pause(n) for n in range(5)] == [1, 2, 4, 5, 5]


def test_a_taken_port_is_named_before_anything_starts(tmp_path):
    topology, ports = write(tmp_path)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", ports[2]))
        squatter.listen(1)
        assert port_holder(ports[2]) is not None
        proc, log = start_up(topology)
        assert proc.wait(timeout=60) == 2
    text = log.read_text()
    assert "router.listen" in text and f"pid {os.getpid()}" in text
    assert not is_listening(ports[0])  # no node was started


def test_sigterm_during_start_up_stops_every_child(tmp_path):
    topology, ports = write(tmp_path)
    proc, log = start_up(topology)
    try:
        wait_for(lambda: is_listening(ports[2]), 60, "the router to listen")  # spawned
        assert health(f"127.0.0.1:{ports[0]}") != "SERVING"  # the node is still loading
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log.read_text()
        assert time.monotonic() - signalled < 10  # a loading node leaves at once
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not children_of_topology(topology), 10, "no child left")
    wait_for(lambda: not any(is_listening(p) for p in ports), 10, "every port closed")


def restarts(metrics_port: int, process: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(rf'ruyiflow_up_restarts_total{{process="{process}"}} (\S+)', text)
    return float(match.group(1)) if match else -1.0


def test_a_dead_daemon_is_restarted_and_children_die_with_up(tmp_path):
    topology, ports = write(tmp_path)
    (metrics_port,) = free_ports(1)
    proc, log = start_up(topology, "--metrics", f"127.0.0.1:{metrics_port}")
    try:
        # The router starts in a second while the node loads its model: restart it meanwhile.
        wait_for(lambda: health(f"127.0.0.1:{ports[2]}") == "SERVING", 60, "the router")
        assert restarts(metrics_port, "router") == 0
        router_pid = int(re.search(r"pid (\d+)", port_holder(ports[2])).group(1))
        os.kill(router_pid, signal.SIGKILL)
        wait_for(lambda: restarts(metrics_port, "router") == 1, 30, "a counted restart")
        wait_for(lambda: health(f"127.0.0.1:{ports[2]}") == "SERVING", 60, "the router back")
        assert proc.poll() is None  # the cluster kept running
        assert "router exited" in log.read_text()
        children = children_of_topology(topology)
        assert len(children) == 2
        proc.kill()  # SIGKILL: no chance to clean up; the kernel kills the children
        proc.wait(timeout=10)
        wait_for(lambda: not children_of_topology(topology), 10, "no child left")
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not any(is_listening(p) for p in ports[:4]), 10, "every port closed")
