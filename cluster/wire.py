"""Proto enums <-> the short names used everywhere else (topology, metrics labels, traces, the
engine's finish reasons), in one place. UNSPECIFIED (0) means "not set": no name maps to it."""

from __future__ import annotations

from collections.abc import Mapping

from ruyiflow.proto import ruyiflow_pb2 as pb

# A token a node streamed without knowing its id (an engine behind a node without a tokenizer):
# the largest uint32, no vocabulary's. Relayed tokens holding it can only be resumed from text.
UNKNOWN_TOKEN_ID = 0xFFFFFFFF


class EnumNames:
    """One proto enum's values by name and names by value."""

    def __init__(self, kind: str, values: Mapping[str, int]):
        self.kind = kind
        self.values = dict(values)
        self.names = {value: name for name, value in self.values.items()}

    def value(self, name: str) -> int:
        """The enum value of `name`; ValueError naming the choices for anything else."""
        if name not in self.values:
            raise ValueError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.values)}")
        return self.values[name]

    def name(self, value: int) -> str:
        """The short name of `value`: `unspecified` for 0, its number as text when unknown."""
        return self.names.get(value, "unspecified" if value == 0 else str(value))

    def __contains__(self, value: object) -> bool:
        return value in self.names


TIER = EnumNames("tier", {"edge": pb.TIER_EDGE, "cloud": pb.TIER_CLOUD})
HANDOFF_MODE = EnumNames(
    "handoff mode",
    {
        "auto": pb.HANDOFF_MODE_AUTO,
        "hidden": pb.HANDOFF_MODE_HIDDEN,
        "tokens": pb.HANDOFF_MODE_TOKENS,
    },
)
HANDOFF_REASON = EnumNames(
    "handoff reason",
    {
        "low_confidence": pb.HANDOFF_REASON_LOW_CONFIDENCE,
        "forced": pb.HANDOFF_REASON_FORCED,
        "node_failure": pb.HANDOFF_REASON_NODE_FAILURE,
        "drain": pb.HANDOFF_REASON_DRAIN,
        "gate": pb.HANDOFF_REASON_GATE,
    },
)
FINISH_REASON = EnumNames(
    "finish reason",
    {
        "stop": pb.FINISH_REASON_STOP,
        "length": pb.FINISH_REASON_LENGTH,
        "handoff": pb.FINISH_REASON_HANDOFF,
        "cancelled": pb.FINISH_REASON_CANCELLED,
    },
)
ENGINE_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}  # engine -> wire name
