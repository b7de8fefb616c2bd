"""What the Node servicer needs from whatever generates tokens: our engine thread
(`node.worker.EngineWorker` over the torch / onnxruntime runners) or an external
OpenAI-compatible engine (`cloud_node.openai_backend`). Both hand out `RequestHandle`s whose
queues carry `TokenEvent` / `LocalSwitch` / `Parked` / `Finished` / Exception items, None at
the end.

`OpenedBackend` is what a daemon has once its backend is up: the backend, its tokenizer, the
facts `Node.Info` reports, and (external engines) a health source the daemon follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ruyiflow.cluster.escalation import EscalationSettings
from ruyiflow.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from ruyiflow.engine.engine import Engine
    from ruyiflow.engine.tokenizer import Tokenizer
    from ruyiflow.node.worker import RequestHandle

CONFIDENCE_MODEL = "model"  # the serving exit's own distribution
CONFIDENCE_LOGPROBS = "logprobs"  # an external engine's top-2 logprobs
CONFIDENCE_NONE = "none"  # no logprobs: max_prob reported as 1, the node never escalates


@dataclass(frozen=True)
class Finished:
    """The stream ended after its last token was sent (an engine's final chunk carries no
    token); the servicer sends a chunk with this finish reason and no token."""

    reason: str  # "stop" | "length" | "abort", as TokenEvent.finish_reason


class NodeBackend(Protocol):
    """The servicer's side of a backend; every method is called from gRPC handler threads."""

    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        exit_layer: int,
        escalation: EscalationSettings,
        prefix_ids: Sequence[int] = (),
    ) -> RequestHandle: ...

    def resume(
        self, request_id: str, data: bytes, exit_layer: int, escalation: EscalationSettings
    ) -> RequestHandle: ...

    def cancel(self, handle: RequestHandle) -> None: ...

    def take_parked(self, handle: str, mode: str) -> bytes: ...

    def load(self) -> tuple[int, int, int]:
        """(running, queued, outstanding tokens)."""
        ...

    def stop(self) -> None: ...


@dataclass(frozen=True)
class BackendFacts:
    """What `Node.Info` reports about the model behind a backend (0 where unknown: an external
    engine's shape is not ours to know, so the router's cost model takes `tokens` mode)."""

    family: str = ""
    num_layers: int = 0
    hidden_size: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    dtype_bytes: int = 0
    confidence: str = CONFIDENCE_MODEL
    prefill_tokens_per_s: float | None = None  # None: what the daemon measured at start

    @classmethod
    def of_engine(cls, engine: Engine) -> BackendFacts:
        c = engine.config
        return cls(
            family=c.family,
            num_layers=c.num_layers,
            hidden_size=c.hidden_size,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            dtype_bytes=engine.state_dtype_bytes,
        )


class HealthSource(Protocol):
    """An external dependency whose health the node's own follows (an engine)."""

    def watch(self, on_change: Callable[[bool], None]) -> None:
        """Call `on_change(is_up)` now and whenever the dependency goes up or down."""
        ...


@dataclass
class OpenedBackend:
    """A started backend and what the servicer and the daemon need beside it."""

    backend: NodeBackend
    tokenizer: Tokenizer
    facts: BackendFacts | Callable[[], BackendFacts]  # a callable: facts learnt while serving
    fingerprint: str
    prefill_tokens_per_s: float
    max_state_bytes: int
    health: HealthSource | None = None  # None: serving as soon as attached
