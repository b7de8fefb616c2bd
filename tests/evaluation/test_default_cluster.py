"""The `default` policy of `eval routing` against real daemons: what it predicts for each prompt
(from `eval exits` results and first-token features made here) is what a real router with an
edge and a cloud node does - the router's difficulty, the exit the thresholds pick and the one
the request starts at, every look of the gate, the exit that serves it and that exit's greedy
tokens. The topology certifies exits 12 and 24 (max_prob thresholds in the widest gap between
the prompts' first-token confidences there) and leaves 16 and 20 shut, so the prompts take
every path: served at 12, moved 12 -> 24 (across nodes, where the gate looks again: a gate
move hands the destination the request's settings), then on to 29, skipped 16 -> 24. If the
router's plan, the nodes' gate or the scorer changes and the policy does not, this fails."""

from __future__ import annotations

import pytest

from ruyiflow.cluster.topology import Topology
from ruyiflow.cmd_up import Cluster
from ruyiflow.engine.engine import Engine
from ruyiflow.evaluation.features import prompts_first_tokens
from ruyiflow.evaluation.gate_policy import default_point, gate_path, topology_gate
from ruyiflow.evaluation.gate_setup import router_scores
from ruyiflow.evaluation.policies import Evaluator
from ruyiflow.evaluation.prompts import Prompt
from ruyiflow.evaluation.results import build_result
from ruyiflow.evaluation.runner import make_engine, run_exits
from ruyiflow.local_cluster import TOPOLOGY, free_ports
from ruyiflow.router.client import RouterClient
from ruyiflow.router.policy import plan_route

MAX_TOKENS = 8
PROMPTS = (  # heuristic difficulty: 0.0 -> exit 12, 0.45 -> 16, 0.68 -> 24
    Prompt("france", "chat", "What is the capital of France?"),
    Prompt("haiku", "chat", "Write a haiku about the sea."),
    Prompt("hello", "chat", "Hi! How are you today?"),
    Prompt("colours", "chat", "Name three primary colours."),
    Prompt("sky", "chat", "Explain why the sky is blue."),
    Prompt("algebra", "chat", "Explain step by step how to solve 3x + 5 = 20."),
)
CALIBRATION = """  escalation:
    enabled: true
    window: 4
    threshold: 0.0001          # mid-stream escalation as good as off: the gate alone moves
    calibration:
      eps: 0.05
      delta: 0.1
      n: 100
      date: "2026-12-03"
      fingerprint: "{fingerprint}"
      exits:
        - {{exit: 12, measure: max_prob, threshold: {t12}}}
        - {{exit: 16, measure: max_prob, threshold: null}}
        - {{exit: 20, measure: max_prob, threshold: null}}
        - {{exit: 24, measure: max_prob, threshold: {t24}}}
"""


def widest_gap(values: list[float]) -> float:
    """A threshold in the widest gap between sorted values (some pass, some do not)."""
    v = sorted(values)
    i = max(range(len(v) - 1), key=lambda k: v[k + 1] - v[k])
    assert v[i + 1] - v[i] > 0.02, v  # far from both: batching noise cannot flip a look
    return round((v[i] + v[i + 1]) / 2, 6)


def topology_text(fingerprint: str, t12: float, t24: float) -> str:
    names = ["edge", "edge_m", "cloud", "cloud_m", "router", "router_m", "router_http"]
    text = TOPOLOGY.format(**dict(zip(names, free_ports(len(names)), strict=True)))
    old = "  escalation: {enabled: false, window: 4, threshold: 0.3}\n"
    assert old in text
    return text.replace(old, CALIBRATION.format(fingerprint=fingerprint, t12=t12, t24=t24))


@pytest.fixture(scope="module")
def predicted(smollm2, tmp_path_factory):
    """The topology file and, per prompt, what `default` predicts: the router's score and
    plan, the gate's path (start, ..., served exit), the outcome; and the `eval exits` results."""
    prompts = list(PROMPTS)
    table = prompts_first_tokens(Engine(smollm2), prompts)
    runs = {}
    run_exits(make_engine(smollm2, 8), prompts, MAX_TOKENS, lambda p, r: runs.update({p.id: r}))
    results = [
        build_result(
            p,
            {e: (r.token_ids, r.text, r.max_prob) for e, r in runs[p.id].items()},
            runs[p.id][29].num_prompt_tokens,
            smollm2.fingerprint,
            MAX_TOKENS,
        )
        for p in prompts
    ]
    path = tmp_path_factory.mktemp("default") / "topology.yaml"
    path.write_text(topology_text(smollm2.fingerprint, 1.0, 1.0))
    scores = router_scores(Topology.load(path), prompts)
    # exit 12: a gap among the prompts the thresholds send there; exit 24: among those that
    # reach it (failing at 12, skipping 16, or sent there)
    first = {p.id: {e: table.measure("max_prob", p.id, e) for e in (12, 24)} for p in prompts}
    to12 = [i for i in first if scores[i] < 0.35]
    t12 = widest_gap([first[i][12] for i in to12])
    t24 = widest_gap([first[i][24] for i in first if i not in to12 or first[i][12] < t12])
    path.write_text(topology_text(smollm2.fingerprint, t12, t24))
    topology = Topology.load(path)
    gate = topology_gate(topology, smollm2.fingerprint, tuple(smollm2.config.exits))
    scores = router_scores(topology, prompts)
    _, chosen = default_point(Evaluator(results), results, topology, scores, table, gate, None)
    plans = {p.id: plan_route(topology, scores[p.id]) for p in prompts}
    paths = {i: gate_path(gate, table, i, plans[i].exit) for i in plans}
    outcomes = {p.id: o for p, o in zip(prompts, chosen, strict=True)}
    return path, scores, plans, paths, outcomes, {r.id: r for r in results}


@pytest.fixture(scope="module")
def served(predicted, tmp_path_factory):
    """Each prompt's completion through a real router and nodes on `predicted`'s topology."""
    path = predicted[0]
    root = tmp_path_factory.mktemp("default-logs")
    cluster = Cluster(str(path), log_dir=root)
    cluster.start()
    try:
        cluster.wait_healthy(timeout=300, progress=False)
        router = path.read_text().split("router:\n  listen: ")[1].split("\n")[0]
        with RouterClient(router) as client:
            yield {p.id: client.complete(p.prompt, max_tokens=MAX_TOKENS) for p in PROMPTS}
    finally:
        cluster.stop(grace=5)


def test_the_prompts_take_every_path(predicted) -> None:
    _, _, plans, paths, _, _ = predicted
    assert any(p == [12] for p in paths.values())  # served where the thresholds sent it
    assert any(p[0] == 12 and len(p) > 1 for p in paths.values())  # moved on by the gate
    assert any(p[:2] == [12, 24] for p in paths.values())  # across nodes, looked at again
    assert any(plan.scored_exit == 16 for plan in plans.values())  # 16 certifies nothing
    assert any(p[-1] == 24 for p in paths.values()) and any(p[-1] == 29 for p in paths.values())


def test_real_daemons_do_what_default_predicts(predicted, served) -> None:
    _, scores, plans, paths, outcomes, results = predicted
    for pid, done in served.items():
        trace, path, plan = done.trace, paths[pid], plans[pid]
        assert trace.difficulty == pytest.approx(scores[pid], abs=1e-6), pid
        skipped = [(g.exit, g.to_exit) for g in trace.gate if g.skipped]
        assert skipped == ([(plan.scored_exit, plan.exit)] if plan.scored_exit else []), pid
        looks = [(g.exit, g.passed) for g in trace.gate if not g.skipped]
        assert looks == [(e, e == path[-1]) for e in path if e < 29], (pid, looks, path)
        serving = [s.exit for s in trace.spans if s.num_tokens]
        assert serving == [path[-1]] == [outcomes[pid].final_exit], (pid, serving, path)
        assert {s.exit for s in done.sources} == {path[-1]}  # nothing from a gated-away exit
        assert done.token_ids == results[pid].exits[path[-1]].token_ids, pid
