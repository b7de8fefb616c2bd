"""Memory and size facts of MoE models: the pre-load estimate and its refusal, KV bytes per token
(the MLA cache holds the latent, not K/V), parameter counts, `ruyiflow models`."""

from __future__ import annotations

import pytest
import torch

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.engine.model import Work
from ruyiflow.engine.moe.hf_config import moe_config_from_hf
from ruyiflow.engine.moe.memory import available_memory, check_memory, estimate_memory, parse_bytes
from tests.moe.test_config import DOTS_LLM1, HUNYUAN_A13B


def test_mla_cache_stores_the_latent(tiny_moe):
    _, _, loaded = tiny_moe("deepseek_v3")
    c, model = loaded.config, loaded.model
    m = c.mla
    cache = model.new_cache()
    model.forward([Work(cache, [1, 2, 3, 4, 5], 0, c.last_exit)])
    elem = torch.tensor([], dtype=model.dtype).element_size()
    per_token = c.num_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * elem
    assert cache.bytes_per_token() == model.kv_bytes_per_token() == per_token
    for i in range(c.num_layers):
        (entry,) = cache.layer(i)  # one tensor per layer: [capacity, kv_lora_rank + rope]
        assert entry.shape == (cache.capacity, m.kv_lora_rank + m.qk_rope_head_dim)
    full_kv = c.num_layers * 2 * c.num_heads * (m.qk_head_dim + m.v_head_dim) // 2 * elem
    assert per_token < full_kv


def test_gqa_cache_bytes(tiny_moe):
    _, _, loaded = tiny_moe("hunyuan_v1_moe")
    c, model = loaded.config, loaded.model
    expected = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 4
    assert model.new_cache().bytes_per_token() == model.kv_bytes_per_token() == expected


@pytest.mark.parametrize("variant", ["hunyuan_v1_moe", "dots1", "deepseek_v3"])
def test_estimate_and_counts_match_the_loaded_model(tiny_moe, variant):
    _, _, loaded = tiny_moe(variant)
    c, model = loaded.config, loaded.model
    assert model.num_parameters() == c.num_parameters()
    assert model.branch_parameters(c.last_exit) == c.num_parameters(active=True)
    held = sum(t.numel() * t.element_size() for layer in model.layers for t in layer.tensors())
    held += model.embed.numel() * 4 + model.norm.numel() * 4
    held += 0 if c.tie_word_embeddings else model.head.numel() * 4
    estimate = estimate_memory(c, torch.float32, max_context=100, max_batch=3)
    assert estimate.weight_bytes == held
    assert estimate.kv_bytes == 3 * 100 * model.kv_bytes_per_token()


def test_refuses_a_model_that_does_not_fit(tiny_moe, monkeypatch):
    path, _, _ = tiny_moe("dots1")
    monkeypatch.setenv("RUYIFLOW_MEMORY_AVAILABLE", "1M")
    with pytest.raises(
        ModelLoadError,
        match=r"needs [0-9.]+ GiB \(weights .* KV cache .* for "
        r"2 x 64 tokens.*only 0\.00 GiB is available \(RUYIFLOW_MEMORY_AVAILABLE",
    ):
        load_model(str(path), max_context=64, max_batch=2)
    monkeypatch.setenv("RUYIFLOW_MEMORY_AVAILABLE", "1G")
    assert load_model(str(path), max_context=64, max_batch=2).config.family == "dots1"


def test_real_sizes_are_refused_with_needed_and_available():
    """dots.llm1 in bf16 with 8 x 32K contexts: ~266 GiB of weights + ~248 GiB of KV cache."""
    config = moe_config_from_hf(DOTS_LLM1)
    estimate = estimate_memory(config, torch.bfloat16, max_context=32768, max_batch=8)
    assert estimate.weight_bytes / 2**30 == pytest.approx(266, abs=1)
    assert estimate.kv_bytes == 8 * 32768 * 1015808
    with pytest.raises(ModelLoadError) as err:
        check_memory(estimate, available_bytes=128 << 30)
    text = str(err.value)
    assert "needs 5" in text and "128.00 GiB is available" in text and "max_context (32768)" in text
    hunyuan = estimate_memory(moe_config_from_hf(HUNYUAN_A13B), torch.bfloat16, 4096, 1)
    check_memory(hunyuan, available_bytes=200 << 30)  # 150 GiB of weights fit in 200


def test_available_memory_sources(tmp_path, monkeypatch):
    assert parse_bytes("64G") == 64 << 30 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("1.5K") == 1536
    with pytest.raises(ModelLoadError, match="expected bytes"):
        parse_bytes("lots")
    monkeypatch.delenv("RUYIFLOW_MEMORY_AVAILABLE", raising=False)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert available_memory(meminfo) == (2 << 20, "MemAvailable in /proc/meminfo")
    meminfo.write_text("MemTotal: 100 kB\n")
    with pytest.raises(ModelLoadError, match="RUYIFLOW_MEMORY_AVAILABLE"):
        available_memory(meminfo)


def test_models_command_reports_moe_facts(tiny_moe):
    from ruyiflow.cmd_models import describe

    _, _, loaded = tiny_moe("deepseek_v3")
    info = describe(loaded)
    (branch,) = info["branches"]
    assert info["family"] == "deepseek_v3" and info["exits"] == [loaded.config.last_exit]
    assert branch["kv_bytes_per_token"] == loaded.model.kv_bytes_per_token()
    assert branch["parameters"] == loaded.config.num_parameters(active=True)
    assert branch["parameters"] < loaded.model.num_parameters()
