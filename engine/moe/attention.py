"""GQA attention weights of the Hunyuan and dots1 families. The attention itself is
`engine.attention.gqa_attention`, shared with the dense families: both use per-head RMSNorm on q
and k, in opposite orders (moe.md §1.3, §2.3) - dots1 (Qwen3 style) norm then RoPE, Hunyuan-A13B
RoPE then norm (`query_layernorm` / `key_layernorm`), so its cache holds rotated and normalised K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GQAWeights:
    w_qkv: torch.Tensor  # [(H + 2*KVH) * D, hidden]; q rows, then k, then v
    w_o: torch.Tensor  # [hidden, H * D]
    q_norm: torch.Tensor | None  # [D]
    k_norm: torch.Tensor | None  # [D]
    b_qkv: None = None  # no MoE family has q/k/v biases

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w_qkv, self.w_o, self.q_norm, self.k_norm) if t is not None]
