"""Proto enum names, one table per enum: every non-zero value of the proto has a short name, and
names and values map both ways."""

from __future__ import annotations

import pytest

from ruyiflow.cluster.wire import FINISH_REASON, HANDOFF_MODE, HANDOFF_REASON, TIER
from ruyiflow.proto import ruyiflow_pb2 as pb


@pytest.mark.parametrize(
    ("names", "enum", "prefix"),
    [
        (TIER, pb.Tier, "TIER_"),
        (HANDOFF_MODE, pb.HandoffMode, "HANDOFF_MODE_"),
        (HANDOFF_REASON, pb.HandoffReason, "HANDOFF_REASON_"),
        (FINISH_REASON, pb.FinishReason, "FINISH_REASON_"),
    ],
)
def test_every_proto_value_has_its_name(names, enum, prefix) -> None:
    for full_name, value in enum.items():
        short = full_name.removeprefix(prefix).lower()
        assert names.name(value) == short
        if value:
            assert names.value(short) == value
    assert names.name(999) == "999"
    with pytest.raises(ValueError, match="choose from"):
        names.value("unspecified")
