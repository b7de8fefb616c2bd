"""Offline tools for the router's learned difficulty scorer (torch allowed; the router never
imports this package): `train` (features → label exit classifier), `export` (ONNX with
metadata), `calibrate` (thresholds for a cloud share, escalation threshold for an escalation
share) and `topology_edit` (writing those into topology.yaml)."""
