"""`ruyiflow bench NAME`: run one benchmark module from `bench/` (never part of the tests)."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "engine": "ruyiflow.bench.engine",
    "cluster": "ruyiflow.bench.cluster",
    "moe": "ruyiflow.bench.moe",
    "cpu-gemv": "ruyiflow.bench.cpu_gemv",
    "edge": "ruyiflow.bench.edge",
    "gpu": "ruyiflow.bench.gpu",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True)
    for name, module in BENCHES.items():
        mod = importlib.import_module(module)
        mod.add_arguments(sub.add_parser(name, help=(mod.__doc__ or "").split("\n")[0]))


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHES[args.bench]).run(args)
