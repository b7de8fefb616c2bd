"""`ruyiflow` command line: one sub-command per verb, each in its own module, imported lazily so
`ruyiflow --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.errors import RuyiflowError

COMMANDS = {
    "generate": ("ruyiflow.cmd_generate", "generate locally with the engine"),
    "models": ("ruyiflow.cmd_models", "describe a model: family, exits, parameters, fingerprint"),
    "bench": ("ruyiflow.cmd_bench", "run a benchmark from bench/"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ruyiflow", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        modules[name] = mod
        mod.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except RuyiflowError as exc:
        print(f"ruyiflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
