"""Edge daemon: serves the shallow exits of a family on an edge machine (torch backend; the
node core in engine/serving decides escalation and parks states for the router to move)."""
