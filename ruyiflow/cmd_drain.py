"""`ruyiflow drain NODE [--undo]`: stop a node admitting new requests (in-flight ones finish;
the router sends new ones elsewhere), or undo that. An operator's command: it calls the node as
`operator` - from this machine, with the cluster secret, or under mTLS with the operator's
certificate from the topology's `tls:` block."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("node", help="node name, as in the topology")
    p.add_argument("--topology", default="topology.yaml")
    p.add_argument("--undo", action="store_true", help="admit new requests again")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the node")


def run(args: argparse.Namespace) -> int:
    import grpc

    from ruyiflow.cluster.access import OPERATOR, dialer_for
    from ruyiflow.cluster.topology_yaml import load_topology
    from ruyiflow.proto import ruyiflow_pb2 as pb
    from ruyiflow.proto import ruyiflow_pb2_grpc as pb_grpc

    topology = load_topology(args.topology)
    try:
        spec = topology.node(args.node)
    except KeyError:
        names = ", ".join(n.name for n in topology.nodes)
        print(f"ruyiflow drain: no node {args.node!r} (nodes: {names})", file=sys.stderr)
        return 2
    with dialer_for(topology, OPERATOR).channel(spec.listen, peer=spec.name) as channel:
        try:
            reply = pb_grpc.NodeStub(channel).Drain(
                pb.DrainRequest(undo=args.undo), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"ruyiflow drain: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    what = "admitting again" if args.undo else "draining"
    print(f"{args.node}: {what} ({reply.num_in_flight} request(s) in flight)")
    return 0
