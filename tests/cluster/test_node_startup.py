"""A node answers UNAVAILABLE (and health NOT_SERVING) until its model is loaded."""

from __future__ import annotations

import pytest

from ruyiflow.engine.errors import NodeUnavailable
from ruyiflow.node.metrics import NodeMetrics
from ruyiflow.node.servicer import NodeIdentity, NodeServicer
from ruyiflow.proto import ruyiflow_pb2 as pb


def test_servicer_refuses_until_attached():
    ident = NodeIdentity("edge-x", "edge", "smollm2", "torch", 8, 2048, (12, 16))
    servicer = NodeServicer(ident, NodeMetrics("edge-x", "edge"))
    with pytest.raises(NodeUnavailable, match="still loading"):
        servicer.Info(pb.InfoRequest(), None)
    with pytest.raises(NodeUnavailable, match="still loading"):
        list(servicer.Generate(pb.GenerateRequest(text="hi"), None))
