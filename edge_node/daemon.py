"""`ruyiflow edge --name N`: the edge tier's daemon."""

from __future__ import annotations

import argparse

from ruyiflow.node.cli import add_node_arguments, run_tier

TIER = "edge"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_node_arguments(p)


def run(args: argparse.Namespace) -> int:
    return run_tier(args, TIER)
