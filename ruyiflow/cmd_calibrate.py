"""`ruyiflow calibrate`: pick router thresholds for a target cloud share (and the escalation
max-prob threshold for a target escalation share of edge requests) on a sample of prompts
scored by the topology's scorer; print the YAML fragment, or `--write` it into the topology.

The method is in `ruyiflow.scorer.calibrate` (cut at a score quantile, other boundaries keep
their relative spacing); `--write` keeps the file's comments except those inside the old
thresholds list (`ruyiflow.scorer.topology_edit`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.engine.errors import InvalidRequest, RuyiflowError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target-cloud-share",
        type=float,
        required=True,
        metavar="S",
        help="share of the sample prompts to route to cloud-tier exits, in [0, 1]",
    )
    p.add_argument("--prompts", required=True, help="prompts file (JSON Lines)")
    p.add_argument("--topology", default="topology.yaml", help="topology file (scorer, exits)")
    p.add_argument(
        "--results",
        default=None,
        help="`ruyiflow eval exits` results with per-token max_prob (for escalation)",
    )
    p.add_argument(
        "--target-escalation-share",
        type=float,
        default=None,
        metavar="E",
        help="share of edge-routed prompts that should escalate, in [0, 1]",
    )
    p.add_argument("--write", action="store_true", help="update the topology file in place")


def run(args: argparse.Namespace) -> int:
    from ruyiflow.cluster.topology import RouterSpec, Topology
    from ruyiflow.evaluation.prompts import load_prompts
    from ruyiflow.evaluation.results import load_results
    from ruyiflow.router.scorers import make_scorer
    from ruyiflow.scorer import calibrate as cal
    from ruyiflow.scorer.topology_edit import RouterUpdate, fragment, update_topology_text

    cal.check_share(args.target_cloud_share, "--target-cloud-share")
    if args.target_escalation_share is not None:
        cal.check_share(args.target_escalation_share, "--target-escalation-share")
        if args.results is None:
            raise InvalidRequest("--target-escalation-share needs --results (per-token max_prob)")
    try:
        topology = Topology.load(args.topology)
    except TopologyError as exc:
        raise RuyiflowError(str(exc)) from None
    prompts = load_prompts(args.prompts)
    spec = topology.router.scorer
    scorer = make_scorer(spec.name, spec.path)
    scores = [scorer.score(p.conversation()) for p in prompts]
    calibrated = cal.calibrate_thresholds(topology, scores, args.target_cloud_share)
    new_topology = cal.with_router(topology, thresholds=calibrated.thresholds)
    print(
        f"scorer {spec.name}: {calibrated.num_prompts} prompts, cut {calibrated.cut:.6f}, "
        f"cloud share {calibrated.cloud_share:.3f} (target {args.target_cloud_share:.3f}); "
        "per exit: " + ", ".join(f"{e}: {n}" for e, n in calibrated.exit_counts.items())
    )
    escalation = None
    if args.results is not None:
        results = load_results(args.results)
        old = topology.router.escalation
        values = cal.edge_values(new_topology, prompts, scores, results)
        print(
            f"escalation now (threshold {old.threshold}, window {old.window}): "
            f"{cal.escalation_share(values, old.threshold):.3f} of {len(values)} edge prompts"
        )
        if args.target_escalation_share is not None:
            esc = cal.calibrate_escalation(
                new_topology, prompts, scores, results, args.target_escalation_share
            )
            escalation = dataclasses.replace(
                old, threshold=esc.threshold, enabled=old.enabled or esc.num_escalated > 0
            )
            print(
                f"escalation threshold {esc.threshold:.6f}: {esc.escalation_share:.3f} of "
                f"{esc.num_edge} edge prompts escalate (target {args.target_escalation_share:.3f}"
                f"; {esc.num_too_short} shorter than the window never do)"
            )
    # The target goes beside the thresholds where the topology has the field (the router
    # exports it next to the realised share, so drift shows in Prometheus).
    has_target = "target_cloud_share" in {f.name for f in dataclasses.fields(RouterSpec)}
    scalars = {"target_cloud_share": args.target_cloud_share} if has_target else {}
    update = RouterUpdate(calibrated.thresholds, escalation, scalars)
    print(fragment(update), end="")
    if args.write:
        path = Path(args.topology)
        updated = update_topology_text(path.read_text(), topology, update)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(updated.text)
        os.replace(tmp, path)
        note = "" if updated.kept_comments else " (re-dumped: its comments were lost)"
        print(f"wrote {path}{note}", file=sys.stderr)
    return 0
