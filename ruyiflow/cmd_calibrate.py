"""`ruyiflow calibrate`: two modes, each printing the YAML fragment, or `--write` it into the
topology (keeping its comments, `ruyiflow.scorer.topology_edit`).

- `--risk EPS [--delta D]`: certify the confidence gate's per-exit thresholds so that, with
  probability >= 1 - D, served tokens disagree with the deepest exit's on at most EPS of
  positions (`ruyiflow.scorer.risk`, Learn-then-Test) -> `router.escalation.calibration`.
  Reads `eval exits` results and their first-token features (`--results`, default: runs the
  exits now) and the trunk probes (`--probes`, default: the ones shipped for the embedded model).
- `--target-cloud-share S`: router thresholds for a cloud share (and the escalation max-prob
  threshold for `--target-escalation-share`) on prompts scored by the topology's scorer
  (`ruyiflow.scorer.calibrate`: cut at a score quantile, other boundaries keep their spacing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
from pathlib import Path

from ruyiflow.cluster.errors import TopologyError
from ruyiflow.engine.errors import InvalidRequest, RuyiflowError


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--risk",
        type=float,
        metavar="EPS",
        help="certify the gate: served tokens disagree with the deepest exit's on <= EPS",
    )
    mode.add_argument(
        "--target-cloud-share",
        type=float,
        metavar="S",
        help="share of the sample prompts to route to cloud-tier exits, in [0, 1]",
    )
    p.add_argument("--delta", type=float, default=0.1, help="--risk: the bound fails w.p. <= D")
    p.add_argument(
        "--probes",
        default=None,
        help="--risk: directory of probe-e<E>.onnx (default: shipped for the embedded model; "
        "'none': no probe)",
    )
    p.add_argument("--prompts", required=True, help="prompts file (JSON Lines)")
    p.add_argument("--topology", default="topology.yaml", help="topology file (scorer, exits)")
    p.add_argument(
        "--results",
        default=None,
        help="`ruyiflow eval exits` results (with <results>.features.npz for --risk)",
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
    return run_risk(args) if args.risk is not None else run_shares(args)


def _load_topology(path: str):
    from ruyiflow.cluster.topology import Topology

    try:
        return Topology.load(path)
    except TopologyError as exc:
        raise RuyiflowError(str(exc)) from None


def _gate_inputs(args: argparse.Namespace, topology):
    """(results, first-token table) of the prompts: read, or run the exits now."""
    from ruyiflow.cmd_train_probe import default_features
    from ruyiflow.evaluation.features import load_first_tokens, prompts_first_tokens
    from ruyiflow.evaluation.prompts import load_prompts
    from ruyiflow.evaluation.results import load_results
    from ruyiflow.evaluation.routing import match_results

    prompts = load_prompts(args.prompts)
    features = default_features(args.results) if args.results else None
    engine = None
    if args.results is None or not features.is_file():
        from ruyiflow.engine.checkpoint import load_model
        from ruyiflow.evaluation.runner import make_engine

        spec = topology.model(topology.routed_model)
        loaded = load_model(spec.path, spec.dtype, overlay=spec.overlay_arg)
        engine = make_engine(loaded, 32)
    if args.results is None:
        from ruyiflow.cmd_eval import _exits_to

        results = _exits_to(None, engine, prompts, 48, False)
    else:
        results = match_results(prompts, load_results(args.results))
    if features is not None and features.is_file():
        table = load_first_tokens(features, results[0].fingerprint)
    else:
        table = prompts_first_tokens(engine, prompts)
        if features is not None:
            table.save(features)
            print(f"wrote {features}", file=sys.stderr)
    return results, table


def run_risk(args: argparse.Namespace) -> int:
    from ruyiflow.evaluation.features import gate_data
    from ruyiflow.node.probe import load_probes, shipped_probes_dir
    from ruyiflow.scorer.risk import calibrate_gate
    from ruyiflow.scorer.risk_report import risk_table
    from ruyiflow.scorer.topology_edit import RouterUpdate

    for name, value in (("--risk", args.risk), ("--delta", args.delta)):
        if not 0.0 < value < 1.0:
            raise InvalidRequest(f"{name} must be in (0, 1), got {value}")
    topology = _load_topology(args.topology)
    results, table = _gate_inputs(args, topology)
    fingerprint = results[0].fingerprint
    shallow = tuple(results[0].exits)[:-1]
    probes_dir = args.probes
    if probes_dir is None and topology.model(topology.routed_model).is_embedded:
        probes_dir = str(shipped_probes_dir())
    probes = {}
    if probes_dir and probes_dir != "none":
        probes = load_probes(probes_dir, shallow, fingerprint)
        missing = [e for e in shallow if e not in probes]
        print(
            f"probes from {probes_dir}: exits {sorted(probes)}"
            + (f" (none for {missing}: the probe measure is left out)" if missing else ""),
            file=sys.stderr,
        )
    data = gate_data(results, table, probes)
    base = {
        "date": datetime.date.today().isoformat(),
        "fingerprint": fingerprint,
        "probes": None if args.probes in (None, "none") else args.probes,
    }
    digests = {e: p.digest for e, p in probes.items()}
    result = calibrate_gate(data, args.risk, args.delta, base, digests)
    print(risk_table(result, data))
    _finish(args, topology, RouterUpdate(None, calibration=result.calibration))
    return 0


def _finish(args: argparse.Namespace, topology, update) -> None:
    """Print the fragment; with --write, put it into the topology file."""
    from ruyiflow.scorer.topology_edit import fragment, update_topology_text

    print(fragment(update), end="")
    if args.write:
        path = Path(args.topology)
        updated = update_topology_text(path.read_text(), topology, update)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(updated.text)
        os.replace(tmp, path)
        note = "" if updated.kept_comments else " (re-dumped: its comments were lost)"
        print(f"wrote {path}{note}", file=sys.stderr)


def run_shares(args: argparse.Namespace) -> int:
    from ruyiflow.cluster.router_spec import RouterSpec
    from ruyiflow.evaluation.prompts import load_prompts
    from ruyiflow.evaluation.results import load_results
    from ruyiflow.router.scorers import make_scorer
    from ruyiflow.scorer import calibrate as cal
    from ruyiflow.scorer.topology_edit import RouterUpdate

    cal.check_share(args.target_cloud_share, "--target-cloud-share")
    if args.target_escalation_share is not None:
        cal.check_share(args.target_escalation_share, "--target-escalation-share")
        if args.results is None:
            raise InvalidRequest("--target-escalation-share needs --results (per-token max_prob)")
    topology = _load_topology(args.topology)
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
    risk = topology.router.escalation.calibration
    if risk is not None:
        certified = ", ".join(str(e.exit) for e in risk.exits if e.is_certified) or "none"
        print(
            f"note: the risk calibration (eps {risk.eps}) certifies exits: {certified}; "
            "requests these thresholds send elsewhere start at the next certified exit, else "
            "the deepest"
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
    _finish(args, topology, RouterUpdate(calibrated.thresholds, escalation, scalars))
    return 0
