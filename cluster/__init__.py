"""Cluster plumbing shared by the router and the node daemons: the topology schema and its YAML
loader, units, gRPC server/channel helpers with the error-mapping interceptor, error types and
their status codes, and the Prometheus HTTP endpoint. Nothing here knows a model or a policy."""
