"""`ruyiflow` command line: one sub-command per verb, each in its own module, imported lazily so
`ruyiflow --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from ruyiflow.cluster.errors import PortInUse, TopologyError
from ruyiflow.engine.errors import RuyiflowError

COMMANDS = {
    "generate": ("ruyiflow.cmd_generate", "generate locally with the engine"),
    "models": ("ruyiflow.cmd_models", "describe a model: family, exits, parameters, fingerprint"),
    "bench": ("ruyiflow.cmd_bench", "run a benchmark from bench/"),
    "edge": ("ruyiflow.edge_node.daemon", "run an edge node daemon"),
    "cloud": ("ruyiflow.cloud_node.daemon", "run a cloud node daemon"),
    "router": ("ruyiflow.router.daemon", "run the router daemon"),
    "up": ("ruyiflow.cmd_up", "start every process of a topology on this machine"),
    "query": ("ruyiflow.cmd_query", "send a prompt to the router and print the route trace"),
    "drain": ("ruyiflow.cmd_drain", "stop a node admitting new requests (--undo: admit again)"),
    "health": (
        "ruyiflow.cmd_health",
        "a router's or node's health on this machine (exit 0: SERVING)",
    ),
    "certs": ("ruyiflow.cmd_certs", "make a development CA and a certificate per process (mTLS)"),
    "export-onnx": ("ruyiflow.cmd_export_onnx", "export a branch as ONNX for onnxruntime nodes"),
    "convert-branch": (
        "ruyiflow.cmd_convert_branch",
        "write a branch as a plain HF checkpoint (for vLLM / SGLang)",
    ),
    "distill": ("ruyiflow.cmd_distill", "train exit branches by self-distillation (an overlay)"),
    "eval": ("ruyiflow.cmd_eval", "evaluate exits and routing policies (quality vs cost)"),
    "train-scorer": ("ruyiflow.cmd_train_scorer", "train the learned difficulty scorer (ONNX)"),
    "train-probe": ("ruyiflow.cmd_train_probe", "train an exit's trunk probe for the gate (ONNX)"),
    "calibrate": (
        "ruyiflow.cmd_calibrate",
        "certify the gate's thresholds for a risk bound (or thresholds for target shares)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ruyiflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    module = None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # import only the command that runs (torch is slow to import)
            module = importlib.import_module(module_name)
            module.add_arguments(p)
    args = parser.parse_args(argv)
    try:
        return int(module.run(args) or 0)
    except (RuyiflowError, TopologyError, PortInUse) as exc:  # expected: one line, no traceback
        print(f"ruyiflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
