"""Held first tokens (the engine side of the confidence gate): a request prefilled at a shallow
exit whose first token is retracted, then moved deeper by a branch switch or a hidden handoff of
its prompt, generates exactly what the deep exit generates on its own; accepting streams the
held token unchanged; pooled prompt features come from the boundary states."""

from __future__ import annotations

import numpy as np
import pytest

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.sampling import SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]
MAX_TOKENS = 12


def chat_ids(loaded, text: str) -> list[int]:
    tok = loaded.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def run(engine: Engine, seq_id: str) -> list[int]:
    out = []
    while engine.has_work():
        for event in engine.step():
            if event.seq_id == seq_id:
                out.append(event.token_id)
    return out


def plain(loaded, ids: list[int], exit_layer: int) -> list[int]:
    params = SamplingParams(max_tokens=MAX_TOKENS)
    return [e.token_id for e in Engine(loaded).generate(ids, params, exit_layer)]


def held_at(engine: Engine, ids: list[int], exit_layer: int) -> str:
    params = SamplingParams(max_tokens=MAX_TOKENS)
    seq_id = engine.add_request(ids, params, exit_layer, hold_first=True)
    while seq_id not in engine.held:
        assert engine.step() == []  # nothing is streamed before the decision
    return seq_id


@pytest.mark.parametrize("text", PROMPTS)
def test_retract_then_switch_equals_the_deep_exit(smollm2, text):
    ids = chat_ids(smollm2, text)
    engine = Engine(smollm2)
    seq_id = held_at(engine, ids, 12)
    held = engine.retract_first(seq_id)
    assert held.exit == 12 and 0.0 < held.confidence.max_prob <= 1.0
    engine.switch_exit(seq_id, 29)
    assert run(engine, seq_id) == plain(smollm2, ids, 29)


def test_retract_then_hidden_handoff_of_the_prompt(smollm2):
    ids = chat_ids(smollm2, PROMPTS[0])
    source, dest = Engine(smollm2), Engine(smollm2)
    seq_id = held_at(source, ids, 16)
    source.retract_first(seq_id)
    state = source.export_state(seq_id, "hidden")
    assert not source.has_work() and not source.held
    moved = dest.import_state(state, exit_layer=29)
    assert run(dest, moved) == plain(smollm2, ids, 29)


def test_cascade_holds_again_at_the_next_exit(smollm2):
    ids = chat_ids(smollm2, PROMPTS[1])
    engine = Engine(smollm2)
    seq_id = held_at(engine, ids, 12)
    engine.retract_first(seq_id, hold_again=True)
    engine.switch_exit(seq_id, 16)
    assert engine.step() == [] and engine.held[seq_id].exit == 16
    first = engine.accept_first(seq_id)
    assert [first.token_id] + run(engine, seq_id) == plain(smollm2, ids, 16)


def test_accept_streams_the_held_token_and_step_refuses_unresolved(smollm2):
    ids = chat_ids(smollm2, PROMPTS[0])
    engine = Engine(smollm2)
    seq_id = held_at(engine, ids, 12)
    with pytest.raises(InvalidRequest, match="held"):
        engine.step()
    first = engine.accept_first(seq_id)
    assert first.exit == 12 and first.token_id == engine.sequences[seq_id].token_ids[-1]
    assert [first.token_id] + run(engine, seq_id) == plain(smollm2, ids, 12)
    with pytest.raises(InvalidRequest, match="no held"):
        engine.accept_first(seq_id)


def test_prompt_features_pool_the_boundary(smollm2):
    ids = chat_ids(smollm2, PROMPTS[0])
    engine = Engine(smollm2)
    seq_id = held_at(engine, ids, 20)
    features = engine.prompt_features(seq_id)
    hidden = smollm2.config.hidden_size
    assert features.shape == (2 * hidden,) and features.dtype == np.float32
    boundary = engine.sequences[seq_id].cache.read_boundary(20, len(ids)).float().numpy()
    np.testing.assert_allclose(features[:hidden], boundary[-1], rtol=1e-6)
    np.testing.assert_allclose(features[hidden:], boundary.mean(axis=0), rtol=1e-5, atol=1e-6)
    engine.abort(seq_id)
    assert not engine.held and not engine.has_work()
