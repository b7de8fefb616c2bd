"""Escalation settings: when a node moves a request to a deeper exit (its confidence stayed under
`threshold` for `window` consecutive tokens), with the defaults every layer uses - the topology's
`router.escalation`, the router's per-request settings and the node's watch."""

from __future__ import annotations

from dataclasses import dataclass

from ruyiflow.engine.errors import InvalidRequest


@dataclass(frozen=True)
class EscalationSettings:
    enabled: bool = False
    window: int = 4
    threshold: float = 0.3
    force_after_tokens: int = 0  # 0 = never forced
    force_to_exit: int | None = None

    def __post_init__(self) -> None:
        if self.window < 1:
            raise InvalidRequest("escalation window must be >= 1")
        if not 0.0 < self.threshold < 1.0:
            raise InvalidRequest("escalation threshold must be in (0, 1)")
        if self.force_after_tokens < 0:
            raise InvalidRequest("force_after_tokens must be >= 0")
