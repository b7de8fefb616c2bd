"""`ruyiflow cloud --name N`: the cloud tier's daemon. Beside our engines it runs nodes backed
by an external OpenAI-compatible engine (`backend: openai`, `cloud_node.openai_backend`)."""

from __future__ import annotations

import argparse
import logging

from ruyiflow.cluster.topology import NodeSpec, Topology
from ruyiflow.node.backend import OpenedBackend
from ruyiflow.node.cli import add_node_arguments
from ruyiflow.node.daemon import open_engine_backend, run_node

TIER = "cloud"


def open_cloud_backend(topology: Topology, spec: NodeSpec) -> OpenedBackend:
    """An external engine for `backend: openai`, else our engine (heavy imports inside)."""
    if spec.backend == "openai":
        from ruyiflow.cloud_node.openai_node import open_openai_backend

        return open_openai_backend(topology, spec)
    return open_engine_backend(topology, spec)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_node_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ruyiflow.cluster.topology_yaml import load_topology

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return run_node(load_topology(args.topology), args.name, TIER, open_backend=open_cloud_backend)
