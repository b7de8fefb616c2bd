"""Tiny random MoE checkpoints in Hugging Face layout, built with transformers' own classes
(HunYuanMoEV1, Dots1, DeepseekV3) and saved with `save_pretrained` beside a tiny tokenizer.

Norm weights, correction biases and router weights are perturbed so that they matter: random init
leaves norms at 1 and biases at 0, and a near-zero router would make every expert look alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny import VOCAB, tiny_tokenizer

FAMILIES = ("hunyuan_v1_moe", "dots1", "deepseek_v3")
# initializer_range 0.1 (not 0.02): activations large enough that every semantic tested here
# (QK-norm order, routed scaling, correction bias, rope base) moves logits far beyond tolerance
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
)


def hf_config(family: str, **extra):
    """A tiny transformers config of `family` (3 layers, 8 experts, top-2/3, shared experts)."""
    from transformers import DeepseekV3Config, Dots1Config, HunYuanMoEV1Config

    if family == "hunyuan_v1_moe":
        # NTK-alpha rope as Hunyuan-A13B ships it ("dynamic" + alpha), GQA, tied head
        kwargs = dict(
            COMMON,
            num_hidden_layers=2,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=48,
            num_experts=8,
            moe_topk=2,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "dynamic",
                "alpha": 1000.0,
                "factor": 1.0,
                "rope_theta": 10000.0,
            },
        )
        cls = HunYuanMoEV1Config
    elif family == "dots1":
        kwargs = dict(
            COMMON,
            num_hidden_layers=3,
            num_key_value_heads=4,
            head_dim=16,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=3,
            n_shared_experts=2,
            first_k_dense_replace=1,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            sliding_window=None,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        )
        cls = Dots1Config
    elif family == "deepseek_v3":
        kwargs = dict(
            COMMON,
            num_hidden_layers=3,
            num_key_value_heads=4,
            intermediate_size=96,
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            q_lora_rank=24,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=12,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            num_nextn_predict_layers=0,
        )
        cls = DeepseekV3Config
    else:
        raise ValueError(family)
    kwargs.update(extra)
    return cls(**kwargs)


def hf_model(family: str, seed: int = 0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **extra), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")):
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("gate.weight") or name.endswith("gate.wg.weight"):
                p.normal_(0.0, 0.5)  # routers far enough from uniform to route distinctly
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.3)
    return model.eval()


def save_moe(path: Path, family: str, seed: int = 0, **extra):
    """Write a tiny `family` checkpoint + tokenizer to `path`; returns the transformers model."""
    model = hf_model(family, seed, **extra)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tiny_tokenizer(path)
    return model


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    """[T, vocab] float32 logits of the transformers model for one sequence."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def hf_greedy(model, ids: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation through transformers' own KV cache (no logits processors, so an
    eos token is just another token, as with our `ignore_eos`)."""
    out, tokens = [], torch.tensor([ids])
    past = None
    with torch.no_grad():
        for _ in range(num_tokens):
            step = model(tokens, past_key_values=past, use_cache=True)
            past = step.past_key_values
            out.append(int(step.logits[0, -1].argmax()))
            tokens = torch.tensor([[out[-1]]])
    return out
