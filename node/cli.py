"""Command-line entry shared by `ruyiflow edge` and `ruyiflow cloud`."""

from __future__ import annotations

import argparse
import logging

from ruyiflow.node.daemon import run_node


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="node name in the topology")
    p.add_argument(
        "--topology", default="topology.yaml", help="topology file (default ./topology.yaml)"
    )
    p.add_argument("--log-level", default="INFO")


def run_tier(args: argparse.Namespace, tier: str) -> int:
    from ruyiflow.cluster.topology_yaml import load_topology

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    return run_node(load_topology(args.topology), args.name, tier)
