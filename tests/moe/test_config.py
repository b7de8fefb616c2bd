"""MoE config.json parsing against moe.md facts, and clear errors for unsupported or mismatched
configs and checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.errors import InvalidRequest, ModelLoadError
from ruyiflow.engine.moe.hf_config import moe_config_from_hf
from ruyiflow.engine.moe.rope import inv_frequencies
from tests.moe.test_parity import IDS, TOL, ours
from tests.moe.tiny_moe import hf_logits

# The released configs' fields as moe.md §1.1, §2.1, §3.1 record them.
HUNYUAN_A13B = {
    "model_type": "hunyuan",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "attention_head_dim": 128,
    "intermediate_size": 3072,
    "moe_intermediate_size": [3072] * 32,
    "num_experts": 64,
    "moe_topk": [8] * 32,
    "num_shared_expert": [1] * 32,
    "use_mixed_mlp_moe": True,
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.0,
    "vocab_size": 128167,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "norm_type": "rms",
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "dynamic",
        "alpha": 1000.0,
        "factor": 1.0,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1,
        "mscale_all_dim": 1,
    },
    "max_position_embeddings": 32768,
    "use_qk_norm": True,
    "use_cla": False,
    "use_mla": False,
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "eos_token_id": 127960,
}
DOTS_LLM1 = {
    "model_type": "dots1",
    "hidden_size": 4096,
    "num_hidden_layers": 62,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 10944,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "moe_intermediate_size": 1408,
    "n_routed_experts": 128,
    "num_experts_per_tok": 6,
    "n_shared_experts": 2,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "scoring_func": "noaux_tc",
    "vocab_size": 152064,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1e7,
    "rope_scaling": None,
    "max_position_embeddings": 32768,
    "sliding_window": None,
    "use_sliding_window": False,
}
JOYAI_FLASH = {
    "model_type": "joyai_llm_flash",
    "hidden_size": 2048,
    "num_hidden_layers": 40,
    "num_attention_heads": 32,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "intermediate_size": 7168,
    "moe_intermediate_size": 768,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "vocab_size": 129280,
    "rms_norm_eps": 1e-6,
    "rope_theta": 3.2e7,
    "max_position_embeddings": 131072,
    "num_nextn_predict_layers": 1,
}


def test_hunyuan_a13b_facts():
    c = moe_config_from_hf(HUNYUAN_A13B)
    assert (c.family, c.scoring, c.qk_norm, c.num_experts_per_tok) == (
        "hunyuan_v1_moe",
        "softmax",
        "after_rope",
        8,
    )
    inv_freq, _ = inv_frequencies(c.rope)
    base = inv_freq[1].item() ** (-c.head_dim / 2)  # inv_freq[i] = base^(-2i/d)
    assert base == pytest.approx(1.1159e7, rel=1e-3)  # 10000 * 1000^(128/126)
    assert c.kv_values_per_token() * 2 == 128 * 1024  # bf16: 128 KiB/token
    assert c.num_parameters() / 1e9 == pytest.approx(80.4, abs=0.1)
    assert c.num_parameters(active=True) / 1e9 == pytest.approx(12.7, abs=0.1)


def test_dots1_and_joyai_facts():
    dots = moe_config_from_hf(DOTS_LLM1)
    assert (dots.scoring, dots.has_correction_bias) == ("sigmoid", True)
    assert dots.qk_norm == "before_rope"
    assert (dots.first_k_dense, dots.shared_intermediate_size, dots.routed_scaling_factor) == (
        1,
        2816,
        2.5,
    )
    assert dots.kv_values_per_token() * 2 / 2**20 == pytest.approx(0.97, abs=0.01)
    assert dots.num_parameters() / 1e9 == pytest.approx(142.8, abs=0.1)
    joy = moe_config_from_hf(JOYAI_FLASH)
    assert joy.family == "deepseek_v3" and joy.mla.latent_dim == 576
    assert joy.kv_values_per_token() * 2 == 45 * 1024  # MLA: 576 values/layer/token
    assert joy.attention_parameters() / 1e6 == pytest.approx(26.3, abs=0.1)
    assert joy.num_parameters() / 1e9 == pytest.approx(48.9, abs=0.1)


@pytest.mark.parametrize(
    "base, change, message",
    [
        (HUNYUAN_A13B, {"model_type": "mixtral"}, "unknown MoE model_type"),
        (HUNYUAN_A13B, {"use_cla": True}, "use_cla"),
        (HUNYUAN_A13B, {"moe_topk": [8] * 31 + [4]}, "moe_topk varies by layer"),
        (HUNYUAN_A13B, {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "without alpha"),
        (HUNYUAN_A13B, {"norm_topk_prob": False}, "norm_topk_prob"),
        (HUNYUAN_A13B, {"num_experts": None}, "missing required field 'num_experts'"),
        (HUNYUAN_A13B, {"moe_topk": [65] * 32}, "num_experts_per_tok 65 exceeds"),
        (DOTS_LLM1, {"hidden_act": "gelu"}, "hidden_act"),
        (DOTS_LLM1, {"scoring_func": "softmax"}, "scoring_func"),
        (DOTS_LLM1, {"layer_types": ["full_attention"] * 61 + ["sliding_attention"]}, "sliding"),
        (DOTS_LLM1, {"n_group": 3}, "do not split into n_group 3"),
        (DOTS_LLM1, {"moe_layer_freq": 2}, "moe_layer_freq"),
        (JOYAI_FLASH, {"kv_lora_rank": None}, "missing required field 'kv_lora_rank'"),
        (JOYAI_FLASH, {"rope_scaling": {"type": "longrope"}}, "unsupported rope type"),
        (JOYAI_FLASH, {"n_routed_experts": "many"}, "malformed field"),
    ],
)
def test_unsupported_or_inconsistent_configs_are_refused(base, change, message):
    with pytest.raises(ModelLoadError, match=message):
        moe_config_from_hf({**base, **change})


def _rewrite(path, edit):
    """Apply edit(dict of tensors) to the checkpoint's single safetensors file."""
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def _copy(tiny_moe, variant, tmp_path):
    src, ref, loaded = tiny_moe(variant)
    dst = tmp_path / variant
    shutil.copytree(src, dst)
    return dst, ref, loaded


def test_checkpoint_mismatches_are_named(tiny_moe, tmp_path):
    path, _, _ = _copy(tiny_moe, "dots1", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 16}))
    with pytest.raises(
        ModelLoadError,
        match=r"model\.layers\.1\.mlp\.experts\.0\.gate_proj"
        r"\.weight' has shape \(32, 64\), expected \(16, 64\)",
    ):
        load_model(str(path))
    (path / "config.json").write_text(json.dumps(config))
    _rewrite(path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(ModelLoadError, match="missing tensor 'model.layers.2.mlp.experts.5.up"):
        load_model(str(path))


def test_unexpected_tensors_are_refused_but_mtp_layers_skipped(tiny_moe, tmp_path):
    path, ref, _ = _copy(tiny_moe, "deepseek_v3", tmp_path)

    def add_mtp(t):
        t["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
        t["model.layers.3.enorm.weight"] = torch.ones(64)

    _rewrite(path, add_mtp)
    with pytest.raises(ModelLoadError, match="unexpected tensors.*model.layers.3.eh_proj"):
        load_model(str(path))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    loaded = load_model(str(path))
    torch.testing.assert_close(ours(loaded, IDS, split=4), hf_logits(ref, IDS)[3:], **TOL)


def test_hunyuan_fused_qkv_and_up_gate_layouts(tiny_moe, tmp_path):
    """`qkv_proj` (per KV head: its q heads, k, v) and `gate_and_up_proj` ([up; gate])."""
    path, ref, loaded = _copy(tiny_moe, "hunyuan_v1_moe", tmp_path)
    c = loaded.config
    group, d = c.num_heads // c.num_kv_heads, c.head_dim

    def fuse(t):
        for i in range(c.num_layers):
            a = f"model.layers.{i}.self_attn"
            q = t.pop(f"{a}.q_proj.weight").view(c.num_kv_heads, group, d, -1)
            k = t.pop(f"{a}.k_proj.weight").view(c.num_kv_heads, 1, d, -1)
            v = t.pop(f"{a}.v_proj.weight").view(c.num_kv_heads, 1, d, -1)
            t[f"{a}.qkv_proj.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, c.hidden_size)
            mlps = [f"model.layers.{i}.mlp.shared_mlp"]
            mlps += [f"model.layers.{i}.mlp.experts.{e}" for e in range(c.num_experts)]
            for m in mlps:
                gate, up = t.pop(f"{m}.gate_proj.weight"), t.pop(f"{m}.up_proj.weight")
                t[f"{m}.gate_and_up_proj.weight"] = torch.cat([up, gate])

    _rewrite(path, fuse)
    torch.testing.assert_close(
        ours(load_model(str(path)), IDS, split=5), hf_logits(ref, IDS)[4:], **TOL
    )


def test_single_exit_and_tokens_only_handoff(tiny_moe):
    from ruyiflow.engine.engine import Engine
    from ruyiflow.engine.sampling import SamplingParams

    path, _, loaded = tiny_moe("deepseek_v3")
    last = loaded.config.last_exit
    assert loaded.config.exits == (last,) == (loaded.config.num_layers - 1,)
    with pytest.raises(ModelLoadError, match="one exit"):
        load_model(str(path), extra_exits=[1])
    engine = Engine(loaded)
    with pytest.raises(InvalidRequest, match="only its last layer"):
        engine.add_request([1, 2, 3], exit_layer=0)
    seq = engine.add_request([5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()
    with pytest.raises(InvalidRequest, match="tokens mode"):
        engine.export_state(seq, mode="hidden", release=False)
    with pytest.raises(InvalidRequest):
        engine.switch_exit(seq, 0)
    resumed = Engine(loaded).import_state(engine.export_state(seq, mode="tokens"))
    assert resumed.startswith("seq-")


def test_example_topology_places_the_moe_node_at_its_last_layer():
    from pathlib import Path

    from ruyiflow.cluster.topology import Topology

    topology = Topology.load(Path(__file__).parents[2] / "deploy" / "topology-moe.yaml")
    last = moe_config_from_hf(HUNYUAN_A13B).last_exit
    assert topology.exit_tiers("hunyuan-a13b") == {last: ("cloud",)}
    assert topology.routed_model == "ruyi-7b"
