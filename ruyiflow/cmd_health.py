"""`ruyiflow health NAME`: the grpc.health.v1 status of one process of the topology (`router` or
a node), asked on this machine's loopback at the port of its `listen` address, as `operator` -
under mTLS with the operator's certificate. Exits 0 when SERVING, 1 otherwise: a Kubernetes exec
probe that works with and without `tls:` (the kubelet's own gRPC probe shows no certificate)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="router or a node name, as in the topology")
    p.add_argument("--topology", default="topology.yaml")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")


def run(args: argparse.Namespace) -> int:
    from ruyiflow.cluster.access import OPERATOR, dialer_for
    from ruyiflow.cluster.topology_yaml import load_topology
    from ruyiflow.cluster.units import parse_address
    from ruyiflow.cmd_up import health

    topology = load_topology(args.topology)
    if args.name == "router":
        listen = topology.router.listen
    else:
        try:
            listen = topology.node(args.name).listen
        except KeyError:
            names = ", ".join(["router", *(n.name for n in topology.nodes)])
            print(f"ruyiflow health: no process {args.name!r} ({names})", file=sys.stderr)
            return 2
    address = f"127.0.0.1:{parse_address(listen)[1]}"  # this pod's or machine's own process
    status = health(address, args.timeout, dialer_for(topology, OPERATOR), args.name)
    print(f"{args.name}: {status}")
    return 0 if status == "SERVING" else 1
