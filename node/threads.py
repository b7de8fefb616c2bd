"""How many CPU threads a node's engine runs: `threads:` from the topology, or this machine's
cores shared among the engine nodes that run on it.

Engine nodes whose listen hosts name the same machine -- every loopback address is this one, else
the same host or IP -- split its cores: each torch or ONNX Runtime process otherwise starts a
thread per core, and N such processes busy-waiting on the same cores ran ~2.5x slower here (two
nodes loading side by side on 2 cores: 15 s against 6.9 s with one thread each). A node that
listens on a wildcard address (0.0.0.0, ::) cannot be placed and takes every core.
"""

from __future__ import annotations

import os

from ruyiflow.cluster.tls import is_loopback_host
from ruyiflow.cluster.topology import NodeSpec, Topology
from ruyiflow.cluster.units import parse_address

ENGINE_BACKENDS = ("torch", "onnxruntime")  # backend openai computes in another process
WILDCARDS = ("0.0.0.0", "::", "")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_of(spec: NodeSpec) -> str | None:
    """What names the machine a node runs on: 'loopback', its host, or None (a wildcard)."""
    host = parse_address(spec.listen, allow_zero=True)[0].lower()
    if is_loopback_host(host):
        return "loopback"
    return None if host in WILDCARDS else host


def engine_threads(topology: Topology, spec: NodeSpec, cores: int | None = None) -> int:
    """Threads for `spec`'s engine (>= 1)."""
    if spec.threads:
        return spec.threads
    cores = cores or usable_cores()
    machine = machine_of(spec)
    if machine is None:
        return cores
    engines = [n for n in topology.nodes if n.backend in ENGINE_BACKENDS]
    sharing = sum(1 for n in engines if machine_of(n) == machine)
    return max(1, cores // max(1, sharing))
