"""Logit and greedy-token parity of the MoE families with transformers on the same weights:
prefill, decode token by token through our cache, packed batches, and the Engine.

transformers 5's `HunYuanMoEV1Gate` is dropless (the capacity limit of Hunyuan's remote code,
moe.md §1.2, is not in it), so Hunyuan is compared on whole prefills as well as one token at a
time; with the remote code's gate only T=1 steps would be comparable.
"""

from __future__ import annotations

import pytest
import torch

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.model import Work
from ruyiflow.engine.sampling import SamplingParams
from tests.moe.conftest import VARIANTS
from tests.moe.tiny_moe import hf_greedy, hf_logits

IDS = [5, 17, 200, 3, 99, 250, 1, 42, 7, 300, 12, 64, 128]
TOL = dict(atol=2e-4, rtol=1e-4)
PROMPTS = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17], [250, 251, 252]]


def ours(loaded, ids: list[int], split: int) -> torch.Tensor:
    """Logits of every position from split-1 on: prefill ids[:split], then one token at a time."""
    model, last = loaded.model, loaded.config.last_exit
    cache = model.new_cache()
    out = [model.forward([Work(cache, ids[:split], 0, last)])[0]]
    for pos in range(split, len(ids)):
        out.append(model.forward([Work(cache, [ids[pos]], pos, last)])[0])
    return torch.stack(out)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_decode_matches_transformers(tiny_moe, variant):
    _, ref, loaded = tiny_moe(variant)
    assert loaded.config.family == VARIANTS[variant][0]
    expected = hf_logits(ref, IDS)
    torch.testing.assert_close(ours(loaded, IDS, split=6), expected[5:], **TOL)


@pytest.mark.parametrize("variant", ["hunyuan_v1_moe", "dots1", "deepseek_v3"])
def test_one_token_at_a_time_matches_transformers(tiny_moe, variant):
    """Decode from the first token on (T=1 steps only: the comparison valid for any gate)."""
    _, ref, loaded = tiny_moe(variant)
    ids = IDS[:8]
    torch.testing.assert_close(ours(loaded, ids, split=1), hf_logits(ref, ids), **TOL)


@pytest.mark.parametrize("variant", ["hunyuan_v1_moe", "dots1", "deepseek_v3"])
def test_packed_batch_equals_each_alone(tiny_moe, variant):
    """Prefill chunks and decode rows of several sequences in one forward == each alone."""
    _, _, loaded = tiny_moe(variant)
    model, last = loaded.model, loaded.config.last_exit
    alone = [ours(loaded, p + [20, 21], split=len(p))[-1] for p in PROMPTS]
    caches = [model.new_cache() for _ in PROMPTS]
    model.forward([Work(caches[0], PROMPTS[0], 0, last), Work(caches[1], PROMPTS[1], 0, last)])
    # decode rows of 0 and 1 beside whole prefills of 2 and 3
    model.forward(
        [
            Work(caches[0], [20], len(PROMPTS[0]), last),
            Work(caches[2], PROMPTS[2], 0, last),
            Work(caches[1], [20], len(PROMPTS[1]), last),
            Work(caches[3], PROMPTS[3], 0, last),
        ]
    )
    early, late = (
        list(zip(caches[:2], PROMPTS[:2], strict=True)),
        list(zip(caches[2:], PROMPTS[2:], strict=True)),
    )
    model.forward(
        [Work(c, [20], len(p), last) for c, p in late]
        + [Work(c, [21], len(p) + 1, last) for c, p in early]
    )
    last_logits = model.forward([Work(c, [21], len(p) + 1, last) for c, p in late])
    got = [None, None, *last_logits]
    for k in (2, 3):
        torch.testing.assert_close(got[k], alone[k], **TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_batch_greedy_equals_transformers(tiny_moe, variant):
    """Several sequences decoded together by the continuous-batching Engine."""
    _, ref, loaded = tiny_moe(variant)
    engine = Engine(loaded, max_batch=8)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ids = {engine.add_request(p, params): i for i, p in enumerate(PROMPTS)}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    while engine.has_work():
        for event in engine.step():
            tokens[ids[event.seq_id]].append(event.token_id)
    for i, prompt in enumerate(PROMPTS):
        assert tokens[i] == hf_greedy(ref, prompt, 8), f"sequence {i}"


@pytest.mark.parametrize("variant", ["hunyuan_v1_moe", "deepseek_v3"])
def test_engine_generate_serves_to_completion(tiny_moe, variant):
    _, ref, loaded = tiny_moe(variant)
    engine = Engine(loaded, max_batch=4)
    prompt = loaded.tokenizer.encode("hello")
    events = list(engine.generate(prompt, SamplingParams(max_tokens=5, ignore_eos=True)))
    assert [e.token_id for e in events] == hf_greedy(ref, prompt, 5)
    assert events[-1].finish_reason == "length" and not engine.has_work()
    assert all(e.exit == loaded.config.last_exit for e in events)


@pytest.mark.parametrize("variant", ["hunyuan_v1_moe", "dots1", "deepseek_v3"])
def test_chunked_prefill_and_cache_growth(tiny_moe, variant):
    """A prompt prefilled in two chunks (the second attends to the first through the cache),
    then decoded past the cache's capacity twice (64 -> 128 -> 256 positions)."""
    _, ref, loaded = tiny_moe(variant)
    model, last = loaded.model, loaded.config.last_exit
    ids = [(37 * i + 11) % 300 + 1 for i in range(140)]
    expected = hf_logits(ref, ids)
    cache = model.new_cache()
    model.forward([Work(cache, ids[:50], 0, last, want_logits=False)])
    got = [model.forward([Work(cache, ids[50:120], 50, last)])[0]]
    for pos in range(120, len(ids)):
        got.append(model.forward([Work(cache, [ids[pos]], pos, last)])[0])
    assert cache.capacity == 256 and cache.length == len(ids)
    torch.testing.assert_close(torch.stack(got), expected[119:], **TOL)


@pytest.mark.parametrize("variant", ["hunyuan_v1_moe", "dots1", "deepseek_v3"])
def test_bfloat16_serving_stays_close(tiny_moe, variant):
    """bfloat16 weights and cache (router and correction bias stay float32)."""
    from ruyiflow.engine.checkpoint import load_model

    path, ref, _ = tiny_moe(variant)
    loaded = load_model(str(path), "bfloat16")
    layer = next(x for x in loaded.model.layers if hasattr(x.ffn, "router"))
    assert layer.ffn.router.dtype == torch.float32 and loaded.model.embed.dtype == torch.bfloat16
    expected = hf_logits(ref, IDS)
    got = ours(loaded, IDS, split=6)
    torch.testing.assert_close(got, expected[5:], atol=0.1, rtol=0.05)
