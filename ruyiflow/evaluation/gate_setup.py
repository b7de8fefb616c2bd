"""`eval routing`'s gate policies: their inputs (first-token features beside the results, the
probes; for `default` the router's scores and the gate as the topology's nodes open it) and the
summary lines of `default` against its calibration (realised disagreement vs eps, answers vs
always-deepest, compute, APGR vs random on both quality measures)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.evaluation.policies import PolicyCurve
from ruyiflow.evaluation.prompts import Prompt
from ruyiflow.evaluation.results import PromptResult
from ruyiflow.evaluation.routing import GateEval


def gate_eval(
    results: Sequence[PromptResult],
    prompts: Sequence[Prompt],
    features: str | Path | None,
    probes: str | None,
    topology_path: str | None,
) -> GateEval | None:
    """The gate policies' inputs; None when the results have no first-token features. With a
    topology, `default` gets its scores from the router's own scorer and request path and its
    gate as the topology's nodes open it (ModelMismatch where they would refuse it)."""
    from ruyiflow.cluster.topology import Topology
    from ruyiflow.evaluation.features import load_first_tokens
    from ruyiflow.evaluation.gate_policy import topology_gate
    from ruyiflow.node.probe import load_probes, shipped_probes_dir

    if features is None or not Path(features).is_file():
        return None
    fingerprint = results[0].fingerprint
    table = load_first_tokens(features, fingerprint)
    topology = Topology.load(topology_path) if topology_path else None
    if probes is None and (topology is None or topology.model(topology.routed_model).is_embedded):
        probes = str(shipped_probes_dir())
    shallow = tuple(results[0].exits)[:-1]
    found = load_probes(probes, shallow, fingerprint) if probes and probes != "none" else {}
    if topology is None:
        return GateEval(table, found)
    if len(topology.models) > 1:
        raise InvalidRequest("the default policy needs a topology serving one model")
    if fingerprint is None:
        raise InvalidRequest("the default policy needs results that name their model")
    gate = topology_gate(topology, fingerprint, results[0].exits)
    return GateEval(table, found, topology, router_scores(topology, prompts), gate)


def router_scores(topology, prompts: Sequence[Prompt]) -> dict[str, float]:
    """Each prompt's difficulty as the topology's router scores it: its scorer built by the
    router's factory, over the request a client sends (`router.requests.score_request`)."""
    from ruyiflow.proto import ruyiflow_pb2 as pb
    from ruyiflow.router.requests import score_request
    from ruyiflow.router.scorers import make_scorer

    spec = topology.router.scorer
    scorer = make_scorer(spec.name, spec.path)
    scores = {}
    for p in prompts:
        request = pb.GenerateRequest()
        for message in p.conversation():
            request.conversation.messages.add(role=message["role"], content=message["content"])
        scores[p.id] = score_request(scorer, request)
    return scores


def default_lines(curves: Sequence[PolicyCurve], gate: GateEval) -> list[str]:
    """What `default` realised: disagreement vs the calibrated eps, answers and compute."""
    by_name = {c.name: c for c in curves}
    if "default" not in by_name:
        return []
    point, deep = by_name["default"].points[0], by_name["always-deepest"].points[0]
    cal = gate.topology.router.escalation.calibration
    bound = f"calibrated eps {cal.eps} (delta {cal.delta}, n {cal.n})" if cal else "no calibration"
    lines = [f"default: realised disagreement {1 - point.agreement:.4f} vs {bound}"]
    if point.answer_accuracy is not None and deep.answer_accuracy:
        share = point.answer_accuracy / deep.answer_accuracy
        lines.append(
            f"default: answer accuracy {point.answer_accuracy:.4f} = {share:.1%} of "
            f"always-deepest's {deep.answer_accuracy:.4f}"
        )
    lines.append(
        f"default: compute {point.compute:.4f} of always-deepest's, cloud share "
        f"{point.cloud_share:.3f}"
    )
    if "random" in by_name:
        apgr = {q: _apgr(curves, q) for q in ("agreement", "answer")}
        lines.append(
            "default: APGR {:.4f} token agreement, {} answer match; random at matched cost "
            "{:.4f}, {} (its expectation is 0.5)".format(
                apgr["agreement"]["default"],
                _fmt(apgr["answer"]["default"]),
                apgr["agreement"]["random"],
                _fmt(apgr["answer"]["random"]),
            )
        )
    return lines


def _apgr(curves: Sequence[PolicyCurve], quality: str) -> dict[str, float | None]:
    from ruyiflow.evaluation.report import summarise_curves

    wanted = [c for c in curves if c.name in ("default", "random", "always-shallowest")]
    wanted += [c for c in curves if c.name == "always-deepest"]
    return {r["policy"]: r["apgr"] for r in summarise_curves(wanted, quality)}


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
