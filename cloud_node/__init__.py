"""Cloud daemon: serves deep exits (and, later, MoE models) and accepts handoffs from edge nodes."""
