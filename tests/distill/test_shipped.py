"""The overlay shipped for the embedded SmolLM2 loads by default and brings every shallow exit
closer to the last one on held-out prompts (prompts never trained on)."""

from __future__ import annotations

from ruyiflow.distill.corpus import chat_ids, generate_many, read_prompts, split_prompts
from ruyiflow.distill.quality import exit_quality, trunk_states
from ruyiflow.engine.checkpoint import EMBEDDED_EXTRA_EXITS, EMBEDDED_OVERLAY, load_model
from ruyiflow.engine.overlay import read_overlay
from ruyiflow.engine.sampling import SamplingParams


def test_shipped_overlay_is_small_and_made_for_the_default_exits():
    assert EMBEDDED_OVERLAY.stat().st_size < 5_000_000
    overlay = read_overlay(EMBEDDED_OVERLAY)
    assert overlay.meta.exits == EMBEDDED_EXTRA_EXITS


def test_shipped_overlay_loads_by_default_and_agrees_more(smollm2):
    assert smollm2.overlay == str(EMBEDDED_OVERLAY)
    plain = load_model("smollm2", overlay="none")
    assert plain.overlay is None and plain.fingerprint != smollm2.fingerprint
    _, held_out = split_prompts(read_prompts())
    greedy = SamplingParams(max_tokens=32)
    jobs = ((chat_ids(plain, p), greedy) for p in held_out[:4])
    samples = generate_many(plain, jobs, max_batch=4)
    groups = trunk_states(plain.model, samples)  # the trunk is the same in both
    before = exit_quality(plain.model, samples, groups)
    after = exit_quality(smollm2.model, samples, groups)
    for b, a in zip(before[:-1], after[:-1], strict=True):
        assert a.top1_agreement > b.top1_agreement, (a, b)
        assert a.kl < b.kl, (a, b)
    assert before[-1] == after[-1]  # the last exit is not part of the overlay
