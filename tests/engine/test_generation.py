"""Engine semantics on the embedded model: answers, batching, exit switching, handoff, sampling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True, **kw)


def run(engine: Engine, prompt: list[int], exit_layer: int, n: int) -> list[int]:
    return [e.token_id for e in engine.generate(prompt, greedy(n), exit_layer)]


def steps(engine: Engine, seq_id: str, n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out += [e.token_id for e in engine.step() if e.seq_id == seq_id]
    return out


@pytest.fixture(scope="module")
def reference(smollm2):
    return Engine(smollm2)


def test_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    )
    events = list(Engine(smollm2).generate(prompt, SamplingParams(max_tokens=24)))
    text = "".join(e.text for e in events)
    assert "Paris" in text, text


def test_batch_of_8_with_joins_and_leaves_matches_alone(smollm2, reference):
    alone = run(reference, PROMPT, 29, 24)
    engine = Engine(smollm2, max_batch=8)
    main = engine.add_request(PROMPT, greedy(24), 29)
    for i in range(4):  # short ones at every exit leave early
        engine.add_request([1, 100 + i, 200 + i, 300], greedy(3 + 2 * i), [12, 16, 20, 24][i])
    out, step = [], 0
    while engine.has_work():
        if step in (2, 5):  # others join mid-flight, one sampled with a seed
            engine.add_request([1, 400 + step] * 4, greedy(6), 16)
            engine.add_request(
                [1, 500 + step] * 3, SamplingParams(max_tokens=6, temperature=0.9, seed=step), 24
            )
        assert len(engine.running) <= 8
        out += [e.token_id for e in engine.step() if e.seq_id == main]
        step += 1
    assert out == alone


@pytest.mark.parametrize(("src", "dst"), [(12, 29), (16, 24), (29, 12), (24, 20)])
def test_switch_exit_equals_destination_branch(smollm2, reference, src, dst):
    engine = Engine(smollm2)
    sid = engine.add_request(PROMPT, greedy(40), src)
    steps(engine, sid, 6)
    prefix = list(engine.sequences[sid].token_ids)
    engine.switch_exit(sid, dst)
    assert engine.sequences[sid].exit == dst
    assert steps(engine, sid, 10) == run(reference, prefix, dst, 10)


def test_switch_keeps_only_valid_cache(smollm2):
    engine = Engine(smollm2)
    sid = engine.add_request(PROMPT, greedy(40), 29)
    steps(engine, sid, 3)
    cache = engine.sequences[sid].cache
    assert cache.num_trunk_layers() == 29
    engine.switch_exit(sid, 16)
    assert cache.num_trunk_layers() == 16 and cache.branch_exits() == {16}
    # pages of the deeper trunk layers, branches and boundaries went back to the pool
    assert cache.num_blocks() == cache.layout.blocks_for(16, cache.length)


@pytest.mark.parametrize(
    ("src", "dst", "mode"),
    [(12, 24, "hidden"), (16, 16, "hidden"), (20, 29, "tokens"), (29, 12, "tokens")],
)
def test_export_import_equals_destination_branch(smollm2, reference, src, dst, mode):
    engine = Engine(smollm2)
    sid = engine.add_request(PROMPT, greedy(40), src)
    steps(engine, sid, 5)
    prefix = list(engine.sequences[sid].token_ids)
    data = engine.export_state(sid, mode)
    assert sid not in engine.sequences  # the sequence moved
    other = Engine(smollm2)
    new_id = other.import_state(data, exit_layer=dst)
    assert steps(other, new_id, 8) == run(reference, prefix, dst, 8)


def test_handoff_to_another_process(smollm2, reference, tmp_path):
    engine = Engine(smollm2)
    sid = engine.add_request(PROMPT, greedy(40), 12)
    steps(engine, sid, 5)
    prefix = list(engine.sequences[sid].token_ids)
    (tmp_path / "state.bin").write_bytes(engine.export_state(sid, "hidden"))
    script = (
        "import json,sys\n"
        "from ruyiflow.engine.checkpoint import load_model\n"
        "from ruyiflow.engine.engine import Engine\n"
        "e = Engine(load_model('smollm2'))\n"
        f"sid = e.import_state(open(r'{tmp_path / 'state.bin'}','rb').read(), exit_layer=29)\n"
        "out = []\n"
        "while len(out) < 8:\n"
        "    out += [ev.token_id for ev in e.step() if ev.seq_id == sid]\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == run(reference, prefix, 29, 8)


def test_same_seed_same_output_whatever_the_batch(smollm2):
    params = SamplingParams(
        max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True
    )
    alone = [e.token_id for e in Engine(smollm2).generate(PROMPT, params, 20)]
    engine = Engine(smollm2)
    for i in range(3):
        engine.add_request(
            [1, 77 + i, 88], SamplingParams(max_tokens=5, temperature=1.0, seed=i), 24
        )
    assert [e.token_id for e in engine.generate(PROMPT, params, 20)] == alone
    other_seed = SamplingParams(**{**params.to_dict(), "seed": 99})
    assert [e.token_id for e in Engine(smollm2).generate(PROMPT, other_seed, 20)] != alone


def test_sampled_handoff_continues_the_rng(smollm2):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    alone = [e.token_id for e in Engine(smollm2).generate(PROMPT, params, 29)]
    engine = Engine(smollm2)
    sid = engine.add_request(PROMPT, params, 29)
    first = steps(engine, sid, 6)
    other = Engine(smollm2)
    new_id = other.import_state(engine.export_state(sid, "hidden"))
    assert first + steps(other, new_id, 10) == alone


def test_stop_conditions(smollm2, reference):
    tok = smollm2.tokenizer
    base = run(reference, PROMPT, 29, 12)
    # max tokens
    events = list(Engine(smollm2).generate(PROMPT, greedy(5), 29))
    assert [e.token_id for e in events] == base[:5] and events[-1].finish_reason == "length"
    # stop token id
    events = list(Engine(smollm2).generate(PROMPT, greedy(12, stop_token_ids=(base[3],)), 29))
    assert [e.token_id for e in events] == base[: base.index(base[3]) + 1]
    assert events[-1].finish_reason == "stop"
    # stop string: text ends before it, never emitted
    full = tok.decode(base)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    events = list(Engine(smollm2).generate(PROMPT, greedy(12, stop=(stop,)), 29))
    text = "".join(e.text for e in events)
    assert stop not in text and full.startswith(text) and events[-1].finish_reason == "stop"


def test_sampling_processors(smollm2, reference):
    base = run(reference, PROMPT, 29, 16)
    top1 = SamplingParams(max_tokens=16, temperature=0.7, top_k=1, seed=3, ignore_eos=True)
    assert [e.token_id for e in Engine(smollm2).generate(PROMPT, top1, 29)] == base
    n = 3
    params = greedy(40, no_repeat_ngram_size=n)
    tokens = PROMPT + [e.token_id for e in Engine(smollm2).generate(PROMPT, params, 29)]
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    assert len(grams) == len(set(grams))
    penalised = [
        e.token_id for e in Engine(smollm2).generate(PROMPT, greedy(16, repetition_penalty=1.5), 29)
    ]
    assert penalised != base and len(set(penalised)) >= len(set(base))


def test_confidence_is_a_distribution_summary(smollm2):
    for e in Engine(smollm2).generate(PROMPT, greedy(6), 12):
        c = e.confidence
        assert 0 < c.max_prob <= 1 and 0 <= c.margin <= c.max_prob and c.entropy >= 0
        assert e.exit == 12
