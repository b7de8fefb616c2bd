"""How many CPU threads a node's engine runs: `threads:` from the topology, or this machine's
cores shared among the engine nodes that run on it.

Nodes that listen on loopback run on this machine (that is how `ruyiflow up` lays out a cluster),
so they split its cores: each torch or ONNX Runtime process otherwise starts a thread per core,
and N such processes busy-waiting on the same cores ran ~2.5x slower here (two nodes loading
side by side on 2 cores: 15 s against 6 s with one thread each). A node that listens beyond
loopback is on a machine of its own and takes every core.
"""

from __future__ import annotations

import os

from ruyiflow.cluster.tls import is_loopback_host
from ruyiflow.cluster.topology import NodeSpec, Topology
from ruyiflow.cluster.units import parse_address

ENGINE_BACKENDS = ("torch", "onnxruntime")  # backend openai computes in another process


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask: taskset, cgroup cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _is_local(spec: NodeSpec) -> bool:
    return is_loopback_host(parse_address(spec.listen, allow_zero=True)[0])


def engine_threads(topology: Topology, spec: NodeSpec, cores: int | None = None) -> int:
    """Threads for `spec`'s engine (>= 1)."""
    if spec.threads:
        return spec.threads
    cores = cores or usable_cores()
    if not _is_local(spec):
        return cores
    sharing = sum(1 for n in topology.nodes if n.backend in ENGINE_BACKENDS and _is_local(n))
    return max(1, cores // max(1, sharing))
