"""Logit parity with Hugging Face transformers on the same weights."""

from __future__ import annotations

import pytest
import torch

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.model import Work
from ruyiflow.kernels import cpu_gemv
from tests import tiny

IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690, 17, 45, 99, 1000, 2000, 3000]
TOL = dict(atol=2e-4, rtol=1e-4)


def ours(loaded, ids, exit_layer, split=None):
    """Logits of every position after the first `split`: prefill ids[:split], then decode."""
    model = loaded.model
    cache = model.new_cache()
    split = split or len(ids)
    out = [model.forward([Work(cache, ids[:split], 0, exit_layer)])[0]]
    for pos in range(split, len(ids)):
        out.append(model.forward([Work(cache, [ids[pos]], pos, exit_layer)])[0])
    return torch.stack(out)


def test_llama_smollm2_matches_transformers(smollm2, hf_smollm2):
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([IDS])).logits[0]
    got = ours(smollm2, IDS, 29, split=9)
    torch.testing.assert_close(got, ref[8:], **TOL)


def test_llama_shallow_exit_is_truncated_model(smollm2_untrained, hf_smollm2):
    """A copied exit e = layers[0..e] + final norm + shared head of the same weights."""
    with torch.no_grad():
        out = hf_smollm2(torch.tensor([IDS]), output_hidden_states=True)
        for e in (12, 20):
            h = out.hidden_states[e + 1][0]  # output of layer e, before the final norm
            ref = hf_smollm2.lm_head(hf_smollm2.model.norm(h))
            got = ours(smollm2_untrained, IDS, e, split=10)
            torch.testing.assert_close(got, ref[9:], **TOL)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_tiny_dense_matches_transformers(tmp_path, family):
    ref_model = tiny.save_plain(tmp_path, family)
    loaded = load_model(str(tmp_path))
    assert loaded.config.family == family
    ids = [5, 17, 200, 3, 99, 250, 1, 42, 7, 300, 12]
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours(loaded, ids, loaded.config.last_exit, split=6), ref[5:], **TOL)


@pytest.mark.parametrize("base", ["qwen2", "qwen3"])
def test_ruyi_branch_equals_plain_model(tmp_path, base):
    exits = [1, 2, 4]
    state, config = tiny.save_ruyi(tmp_path, base, exits, num_layers=5)
    loaded = load_model(str(tmp_path))
    assert loaded.config.exits == tuple(exits) and loaded.config.native_branches
    ids = [9, 8, 250, 31, 77, 2, 140, 66, 5]
    for e in exits:
        ref_model = tiny.branch_as_plain(state, config, exits, e)
        with torch.no_grad():
            ref = ref_model(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(ours(loaded, ids, e, split=5), ref[4:], **TOL)


def test_batch_of_several_sequences_matches_alone(tmp_path):
    """Packed forward of sequences at different exits and positions == each alone."""
    tiny.save_ruyi(tmp_path, "qwen2", [1, 2, 4], num_layers=5)
    loaded = load_model(str(tmp_path))
    model = loaded.model
    prompts = [([3, 4, 5, 6], 4), ([7, 8], 1), ([9, 10, 11], 2), ([12, 13, 14, 15, 16], 4)]
    alone = [ours(loaded, p + [20, 21], e, split=len(p))[-1] for p, e in prompts]
    caches = [model.new_cache() for _ in prompts]
    model.forward([Work(c, p, 0, e) for c, (p, e) in zip(caches, prompts, strict=True)])
    model.forward([Work(c, [20], len(p), e) for c, (p, e) in zip(caches, prompts, strict=True)])
    pairs = list(zip(caches, prompts, strict=True))
    last = model.forward([Work(c, [21], len(p) + 1, e) for c, (p, e) in pairs])
    for got, ref in zip(last, alone, strict=True):
        torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_close_to_float32(tmp_path, dtype):
    tiny.save_plain(tmp_path, "qwen2")
    ids = [5, 17, 200, 3, 99, 250]
    ref = ours(load_model(str(tmp_path)), ids, 3)
    got = ours(load_model(str(tmp_path), dtype), ids, 3)
    assert load_model(str(tmp_path), dtype).model.embed.dtype == getattr(torch, dtype)
    torch.testing.assert_close(got, ref, atol=0.1, rtol=0.05)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    model = tiny.save_plain(single, "qwen2")
    model.save_pretrained(sharded, max_shard_size="100KB")
    tiny.tiny_tokenizer(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a, b = load_model(str(single)), load_model(str(sharded))
    assert a.fingerprint == b.fingerprint
    for wa, wb in zip(weights(a), weights(b), strict=True):
        assert torch.equal(wa, wb)
    ids = [5, 17, 200, 3, 99]
    got_a, got_b = ours(a, ids, 3), ours(b, ids, 3)  # the same CPU GEMV path for both
    if cpu_gemv.active_path() == "off":
        # F.linear's blocking follows the weights' alignment, which memory-mapped shards do not
        # keep: equal up to float32 rounding only.
        torch.testing.assert_close(got_a, got_b)
    else:  # the C kernels' results do not depend on addresses (tests/kernels/test_cpu_gemv.py)
        torch.testing.assert_close(got_a, got_b, rtol=0, atol=0)


def weights(loaded) -> list[torch.Tensor]:
    """Every weight tensor of a loaded dense model, in a fixed order."""
    model = loaded.model
    out = [model.embed, *(t for layer in model.layers for t in layer.tensors())]
    for e in sorted(model.branches):
        branch = model.branches[e]
        out += [*branch.layer.tensors(), branch.norm, branch.head]
    return out
