"""Read an MoE `config.json` (transformers-native or the checkpoints' own remote-code fields) into a
`MoEConfig`, refusing what the math here does not implement instead of loading it wrongly.

Accepted `model_type`s: `hunyuan_v1_moe` and `hunyuan` (Hunyuan-A13B's remote code), `dots1`,
`deepseek_v3` and `joyai_llm_flash` (JoyAI-LLM Flash is DeepSeek-V3 architecture). The facts
checked come from `shared/research/moe.md` and transformers' modelling code.
"""

from __future__ import annotations

from typing import Any

from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.engine.moe.config import MLAConfig, MoEConfig, MoERope

MODEL_TYPES = {
    "hunyuan_v1_moe": "hunyuan_v1_moe",
    "hunyuan": "hunyuan_v1_moe",
    "dots1": "dots1",
    "deepseek_v3": "deepseek_v3",
    "joyai_llm_flash": "deepseek_v3",
}


def is_moe_config(d: dict[str, Any]) -> bool:
    return d.get("model_type") in MODEL_TYPES


def _need(d: dict[str, Any], key: str) -> Any:
    if d.get(key) is None:
        model_type = d.get("model_type")
        raise ModelLoadError(f"config.json ({model_type}) is missing required field {key!r}")
    return d[key]


def _uniform(d: dict[str, Any], key: str, default: Any = None) -> Any:
    """A per-layer list field (Hunyuan's `moe_topk: [8]*32`) that must hold one value."""
    value = d.get(key)
    if value is None:
        return _need(d, key) if default is None else default
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise ModelLoadError(
                f"config field {key} varies by layer ({value}); only one value "
                "for every layer is supported"
            )
        return value[0]
    return value


def _refuse(d: dict[str, Any], key: str, allowed: tuple[Any, ...], why: str) -> None:
    if d.get(key) is not None and d[key] not in allowed:  # null counts as absent
        raise ModelLoadError(f"config field {key}={d[key]!r} is not supported ({why})")


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _rope(d: dict[str, Any], dim: int, interleaved: bool = False) -> MoERope:
    """Old `rope_theta` + `rope_scaling` or transformers-5 `rope_parameters`."""
    merged = {**(d.get("rope_scaling") or {}), **(d.get("rope_parameters") or {})}
    theta = float(merged.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "dynamic":
        if not merged.get("alpha"):  # transformers' Hunyuan only turns "dynamic" static with alpha
            raise ModelLoadError(
                "rope type 'dynamic' without alpha (length-dependent NTK) is "
                "not supported; Hunyuan uses 'dynamic' with alpha"
            )
        kind = "ntk_alpha"
    factor = merged.get("factor")
    max_pos = int(d.get("max_position_embeddings", 4096))
    original = int(
        merged.get(
            "original_max_position_embeddings", d.get("original_max_position_embeddings", max_pos)
        )
    )
    if kind == "yarn" and factor is None:  # transformers derives it the same way
        factor = max_pos / original
    return MoERope(
        theta=theta,
        dim=dim,
        rope_type=str(kind),
        factor=float(factor or 1.0),
        alpha=float(merged.get("alpha") or 1.0),
        original_max_position_embeddings=original,
        beta_fast=float(merged.get("beta_fast") or 32),
        beta_slow=float(merged.get("beta_slow") or 1),
        mscale=float(merged.get("mscale") or 0.0),
        mscale_all_dim=float(merged.get("mscale_all_dim") or 0.0),
        attention_factor=merged.get("attention_factor"),
        truncate=bool(merged.get("truncate", True)),
        interleaved=interleaved,
    )


def _common(d: dict[str, Any], family: str) -> dict[str, Any]:
    if d.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {d['hidden_act']!r} unsupported (only silu)")
    _refuse(d, "attention_bias", (False,), "no attention biases in these families")
    _refuse(d, "mlp_bias", (False,), "no MLP biases in these families")
    _refuse(d, "use_sliding_window", (False,), "sliding-window attention")
    if any(t != "full_attention" for t in d.get("layer_types") or []):
        raise ModelLoadError(
            f"layer_types {d['layer_types']} include sliding-window attention, "
            "which is not supported"
        )
    heads = int(_need(d, "num_attention_heads"))
    return dict(
        family=family,
        vocab_size=int(_need(d, "vocab_size")),
        hidden_size=int(_need(d, "hidden_size")),
        num_layers=int(_need(d, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_ids(d.get("eos_token_id")),
    )


def _hunyuan(d: dict[str, Any]) -> MoEConfig:
    base = _common(d, "hunyuan_v1_moe")
    _refuse(d, "use_cla", (False,), "cross-layer attention; Hunyuan-A13B ships use_cla: false")
    _refuse(d, "use_mla", (False,), "Hunyuan MLA variant")
    _refuse(d, "norm_type", ("rms", "hf_rms"), "only RMSNorm")
    _refuse(d, "norm_topk_prob", (True,), "Hunyuan's gate always renormalises the top-k")
    _refuse(d, "routed_scaling_factor", (1.0, 1), "Hunyuan's gate does not scale")
    _refuse(d, "group_limited_greedy", (False,), "group-limited routing")
    for key in ("n_group", "topk_group"):
        _refuse(d, key, (None, 1), "Hunyuan routes without groups")
    head_dim = int(
        d.get("head_dim") or d.get("attention_head_dim") or base["hidden_size"] // base["num_heads"]
    )
    inter = int(_need(d, "intermediate_size"))
    num_shared = int(_uniform(d, "num_shared_expert", 1))
    if d.get("use_mixed_mlp_moe") is False:
        num_shared = 0
    return MoEConfig(
        **base,
        head_dim=head_dim,
        intermediate_size=inter,
        rope=_rope(d, head_dim),
        num_experts=int(_uniform(d, "num_experts")),
        num_experts_per_tok=int(_uniform(d, "moe_topk", d.get("num_experts_per_tok", 1))),
        moe_intermediate_size=int(_uniform(d, "moe_intermediate_size", inter)),
        shared_intermediate_size=inter * num_shared,
        scoring="softmax",
        norm_topk_prob=True,
        qk_norm="after_rope" if d.get("use_qk_norm", True) else "none",
    )


def _routing(d: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3 `noaux_tc` routing, shared by dots1 (always sigmoid + correction bias)."""
    _refuse(d, "scoring_func", ("sigmoid", "noaux_tc"), "routing is sigmoid + correction bias")
    _refuse(d, "topk_method", ("noaux_tc",), "routing is DeepSeek-V3 noaux_tc")
    _refuse(d, "moe_layer_freq", (1,), "every layer after first_k_dense_replace is MoE")
    moe_inter = int(_need(d, "moe_intermediate_size"))
    return dict(
        intermediate_size=int(_need(d, "intermediate_size")),
        num_experts=int(_need(d, "n_routed_experts")),
        num_experts_per_tok=int(_need(d, "num_experts_per_tok")),
        moe_intermediate_size=moe_inter,
        shared_intermediate_size=moe_inter * int(_need(d, "n_shared_experts")),
        first_k_dense=int(d.get("first_k_dense_replace") or 0),
        scoring="sigmoid",
        has_correction_bias=True,
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
        num_groups=int(d.get("n_group") or 1),
        topk_groups=int(d.get("topk_group") or 1),
    )


def _dots1(d: dict[str, Any]) -> MoEConfig:
    base = _common(d, "dots1")
    if d.get("layer_types") is None and d.get("sliding_window") is not None:
        window_layers = int(d.get("max_window_layers", 62))  # transformers' Dots1Config rule
        if window_layers < base["num_layers"]:
            raise ModelLoadError(
                f"layers >= max_window_layers {window_layers} would use sliding "
                "window attention, which is not supported"
            )
    head_dim = int(d.get("head_dim") or base["hidden_size"] // base["num_heads"])
    return MoEConfig(
        **base, **_routing(d), head_dim=head_dim, rope=_rope(d, head_dim), qk_norm="before_rope"
    )


def _deepseek_v3(d: dict[str, Any]) -> MoEConfig:
    base = _common(d, "deepseek_v3")
    mla = MLAConfig(
        q_lora_rank=None if d.get("q_lora_rank") is None else int(d["q_lora_rank"]),
        kv_lora_rank=int(_need(d, "kv_lora_rank")),
        qk_nope_head_dim=int(_need(d, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_need(d, "qk_rope_head_dim")),
        v_head_dim=int(_need(d, "v_head_dim")),
    )
    base["num_kv_heads"] = 1  # the latent cache is one head shared by every query head
    rope = _rope(d, mla.qk_rope_head_dim, interleaved=bool(d.get("rope_interleave", True)))
    return MoEConfig(
        **base,
        **_routing(d),
        head_dim=mla.latent_dim,
        rope=rope,
        mla=mla,
        num_mtp_layers=int(d.get("num_nextn_predict_layers") or 0),
    )


PARSERS = {"hunyuan_v1_moe": _hunyuan, "dots1": _dots1, "deepseek_v3": _deepseek_v3}


def moe_config_from_hf(d: dict[str, Any]) -> MoEConfig:
    """MoEConfig from a parsed config.json; ModelLoadError names the offending field."""
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(f"unknown MoE model_type {model_type!r}; known: {sorted(MODEL_TYPES)}")
    try:
        return PARSERS[MODEL_TYPES[model_type]](d)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"config.json ({model_type}): malformed field ({exc})") from exc
