"""Batched runs on a tiny checkpoint: every exit as the engine generates it alone, and
escalation that really switches the running sequence to the deepest exit."""

from __future__ import annotations

import re

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.evaluation.prompts import load_prompts
from ruyiflow.evaluation.runner import prompt_ids, run_escalation, run_exits
from ruyiflow.node.escalation import EscalationSettings

MAX_TOKENS = 6


def alone(model, ids, exit_layer, max_tokens=MAX_TOKENS):
    events = list(Engine(model).generate(ids, SamplingParams(max_tokens=max_tokens), exit_layer))
    return [e.token_id for e in events], [e.confidence.max_prob for e in events]


def test_run_exits_matches_unbatched_generation(tiny_model, prompt_file):
    prompts = load_prompts(prompt_file)
    engine = Engine(tiny_model, max_batch=5)
    got = {}
    run_exits(engine, prompts, MAX_TOKENS, lambda p, runs: got.__setitem__(p.id, runs))
    assert list(got) and set(got) == {p.id for p in prompts}
    for p in prompts:
        ids = prompt_ids(engine, p)
        assert set(got[p.id]) == {1, 2, 4}
        for exit_layer, run in got[p.id].items():
            tokens, probs = alone(tiny_model, ids, exit_layer)
            assert run.token_ids == tokens and run.token_exits == [exit_layer] * len(tokens)
            assert [round(x, 5) for x in run.max_prob] == [round(x, 5) for x in probs]
            assert run.switched_at is None
            assert run.compute() == (exit_layer + 1) * (len(ids) + len(tokens) - 1)


def test_escalation_switches_to_the_deepest_exit(tiny_model, prompt_file):
    prompts = load_prompts(prompt_file)[:2]
    engine = Engine(tiny_model, max_batch=3)
    # random weights keep max_prob far below 0.99: the one-token window fires at once
    fire = EscalationSettings(enabled=True, window=1, threshold=0.99)
    runs = run_escalation(engine, prompts, MAX_TOKENS, fire)
    assert set(runs) == {(p.id, e) for p in prompts for e in (1, 2)}
    for (pid, start), run in runs.items():
        ids = prompt_ids(engine, next(p for p in prompts if p.id == pid))
        plain, _ = alone(tiny_model, ids, start)
        assert run.switched_at == 1 and run.final_exit == 4
        assert run.token_exits == [start] + [4] * (len(run.token_ids) - 1)
        assert run.token_ids[0] == plain[0]
        # after the switch the deepest exit continues the same sequence: as if it had been
        # given the prompt plus the first token, and unlike the start exit on its own
        rest, _ = alone(tiny_model, ids + run.token_ids[:1], 4, MAX_TOKENS - 1)
        assert run.token_ids[1:] == rest[: len(run.token_ids) - 1]
        assert run.token_ids != plain
        fed = len(ids) + len(run.token_ids) - 1
        assert run.compute() == (start + 1) * len(ids) + (4 - start + 1) * len(ids) + 5 * (
            fed - len(ids)
        )


def test_escalation_that_never_fires_is_the_plain_run(tiny_model, prompt_file):
    prompts = load_prompts(prompt_file)[:1]
    never = EscalationSettings(enabled=True, window=50, threshold=0.01)
    runs = run_escalation(Engine(tiny_model, max_batch=2), prompts, MAX_TOKENS, never)
    ids = prompt_ids(Engine(tiny_model), prompts[0])
    for (_, start), run in runs.items():
        assert run.switched_at is None and run.final_exit == start
        assert run.token_ids == alone(tiny_model, ids, start)[0]


def test_runs_show_runs_done_and_tokens_per_second(tiny_model, prompt_file, capsys):
    prompts = load_prompts(prompt_file)
    run_exits(Engine(tiny_model, max_batch=5), prompts, MAX_TOKENS, lambda p, runs: None)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines  # not a terminal: its start and its end, no redraws
    last = lines[-1]  # 4 prompts x 3 exits; tqdm writes s/run below one run a second
    assert last.startswith("eval exits: 100% 12/12 ["), last
    rate = re.search(r"(run/s|s/run), tok/s=(\d+)\]$", last)
    assert rate and int(rate.group(2)) > 0, last


def test_smollm2_deepest_exit_answers_a_fact(smollm2):
    from ruyiflow.evaluation.prompts import Prompt
    from ruyiflow.evaluation.results import build_result

    prompt = Prompt("f", "facts", "What is the capital of France?", "Paris")
    engine = Engine(smollm2, max_batch=5)
    got = {}
    run_exits(engine, [prompt], 8, lambda p, runs: got.update(runs))
    result = build_result(prompt, {e: (r.token_ids, r.text, r.max_prob) for e, r in got.items()})
    assert list(result.exits) == [12, 16, 20, 24, 29]
    deepest = result.exits[29]
    assert deepest.answer_match is True and deepest.agreement == 1.0, deepest.text
    assert result.label_exit == min(
        e for e, r in result.exits.items() if r.agreement >= 0.9 and r.answer_match
    )
