"""`ruyiflow query`: send a prompt through the router, stream the answer, print the route trace."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--router",
        default=None,
        help="router address, or several of one cluster comma-separated (default: every "
        "router of the topology); a stream resumes on the next if its router dies",
    )
    p.add_argument("--topology", default="topology.yaml")
    p.add_argument("--max-tokens", type=int, default=128)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--exit", type=int, default=None, help="serve at this exit")
    group.add_argument("--tier", choices=["edge", "cloud"], default=None, help="serve on this tier")
    p.add_argument("--node", default=None, help="serve on this node")
    p.add_argument("--handoff-mode", choices=["auto", "hidden", "tokens"], default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--thinking", choices=["on", "off"], default=None)
    p.add_argument(
        "--raw", action="store_true", help="send the prompt as raw text (no chat template)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("prompt")


def router_address(args: argparse.Namespace) -> list[str]:
    """`--router`'s addresses, else those of the topology's router and its replicas."""
    if args.router:
        return [a.strip() for a in args.router.split(",") if a.strip()]
    from ruyiflow.cluster.topology_yaml import load_topology

    return list(load_topology(args.topology).router.listens)


def client_tls(args: argparse.Namespace):  # noqa: ANN201
    """The operator's TLS files when the topology (if it exists) has a `tls:` block."""
    from pathlib import Path

    from ruyiflow.cluster.tls import tls_files
    from ruyiflow.cluster.topology_yaml import load_topology

    if not Path(args.topology).is_file():
        return None
    return tls_files(load_topology(args.topology), "operator")


def run(args: argparse.Namespace) -> int:
    from ruyiflow.router.client import RouterClient, format_trace, trace_to_dict

    options = dict(
        max_tokens=args.max_tokens,
        exit=args.exit,
        tier=args.tier,
        node=args.node,
        handoff_mode=args.handoff_mode,
        temperature=args.temperature,
        seed=args.seed,
        enable_thinking=None if args.thinking is None else args.thinking == "on",
        raw=args.raw,
    )
    with RouterClient(router_address(args), tls=client_tls(args)) as client:
        if args.json:
            result = client.complete(args.prompt, **options)
            print(
                json.dumps(
                    {
                        "text": result.text,
                        "token_ids": result.token_ids,
                        "finish_reason": result.finish_reason,
                        "trace": trace_to_dict(result.trace),
                    }
                )
            )
            return 0
        trace = None
        for chunk in client.generate(args.prompt, **options):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            if chunk.HasField("trace"):
                trace = chunk.trace
        print()
        if trace is not None:
            print(format_trace(trace), file=sys.stderr)
    return 0
