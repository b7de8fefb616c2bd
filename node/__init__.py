"""Node core shared by the edge and cloud daemons: an engine thread, the Node gRPC servicer,
escalation watching, parked handoff states and node metrics."""
