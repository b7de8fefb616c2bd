"""One node of the topology (`NodeSpec`): where it listens, the model and exits it serves, its
limits, and its backend -- our engine (torch, onnxruntime) or an OpenAI-compatible engine --
validated on construction like every spec (`cluster.topology` checks it against the rest)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.cluster.spec_checks import (
    ENGINE_URL_RE,
    ENV_NAME_RE,
    check,
    check_addresses,
    check_exits,
    check_name,
    check_one_of,
)
from ruyiflow.engine.device import check_device_name

TIERS = ("edge", "cloud")  # shallow first: ties go to the cheaper tier
BACKENDS = ("torch", "onnxruntime", "openai")  # openai: an external engine (cloud nodes)
ENGINE_FIELDS = ("base_url", "served_model", "api_key_env", "tokenizer", "command")


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
        check_name(self.name, "name")
        check(
            self.name != "router" and not re.fullmatch(r"router-\d+", self.name),
            "name",
            "'router' and 'router-N' are reserved for the routers",
        )
        check_one_of(self.tier, TIERS, "tier")
        check_addresses(self, ("listen", "metrics"))
        check(bool(self.model), "model", "must not be empty")
        check_exits(self.exits, "exits", allow_empty=False)
        check_one_of(self.backend, BACKENDS, "backend")
        check(self.max_batch >= 1, "max_batch", "must be >= 1")
        check(self.max_context >= 1, "max_context", "must be >= 1")
        check(self.max_queue >= 0, "max_queue", "must be >= 0 (0: 4 x max_batch)")
        check(self.max_queued_tokens >= 0, "max_queued_tokens", "must be >= 0 (0: no bound)")
        check(self.threads >= 0, "threads", "must be >= 0 (0: share this machine's cores)")
        for key in ("providers", "onnx_dir"):
            check(
                not getattr(self, key) or self.backend == "onnxruntime",
                key,
                "only valid with backend onnxruntime",
            )
        self._check_device()
        check(self.timeout_s > 0 and math.isfinite(self.timeout_s), "timeout_s", "must be > 0")
        check(self.max_concurrency >= 0, "max_concurrency", "must be >= 0 (0: max_batch)")
        if self.backend == "openai":
            self._check_engine()
            check(not self.threads, "threads", "not valid with backend openai (the engine's own)")
        else:
            for key in ENGINE_FIELDS:
                check(not getattr(self, key), key, "only valid with backend openai")

    def _check_device(self) -> None:
        try:
            check_device_name(self.device)
        except ValueError as exc:
            raise TopologyError(str(exc), "device") from None
        check(
            self.device == "cpu" or self.backend == "torch",
            "device",
            "only valid with backend torch (onnxruntime picks devices with providers)",
        )

    def _check_engine(self) -> None:
        check(self.tier == "cloud", "backend", "backend openai runs on cloud nodes")
        check(
            bool(self.base_url) and bool(ENGINE_URL_RE.fullmatch(self.base_url or "")),
            "base_url",
            "must be an http(s) URL such as http://10.0.0.5:8000/v1",
        )
        check(bool(self.served_model), "served_model", "required with backend openai")
        check(
            len(self.exits) == 1,
            "exits",
            "an engine serves one exit (the model's last layer, or a converted branch's exit)",
        )
        if self.api_key_env is not None:
            check(
                bool(ENV_NAME_RE.fullmatch(self.api_key_env)),
                "api_key_env",
                "must name an environment variable",
            )
        check(all(self.command), "command", "arguments must not be empty")

    @property
    def max_streams(self) -> int:
        """Streams the node takes at once: the batch plus its queue."""
        return self.max_batch + (self.max_queue or 4 * self.max_batch)

    @property
    def engine_concurrency(self) -> int:
        """Streams the node opens on its engine at once (backend openai)."""
        return self.max_concurrency or self.max_batch
