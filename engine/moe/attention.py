"""GQA attention of the Hunyuan and dots1 families, over a packed batch of sequence segments.

Both use per-head RMSNorm on q and k, in opposite orders (moe.md §1.3, §2.3):
- dots1 (Qwen3 style): norm, then RoPE;
- Hunyuan-A13B: RoPE, then norm (`query_layernorm` / `key_layernorm`), so the cache holds rotated
  and normalised K.
Projections cover every row at once; the per-segment causal attention over each sequence's own KV
is `engine.layers.attention`, shared with the dense families.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ruyiflow.engine.layers import Segment, attention
from ruyiflow.engine.moe.ops import head_rms, linear
from ruyiflow.engine.rope import apply_rope


@dataclass
class GQAWeights:
    w_qkv: torch.Tensor  # [(H + 2*KVH) * D, hidden]; q rows, then k, then v
    w_o: torch.Tensor  # [hidden, H * D]
    q_norm: torch.Tensor | None  # [D]
    k_norm: torch.Tensor | None  # [D]
    qk_norm: torch.Tensor | None = None  # [H + KVH, D]: q_norm per q head, k_norm per k head

    def tensors(self) -> list[torch.Tensor]:
        """The parameters (the stacked norm weight is a derived copy)."""
        return [t for t in (self.w_qkv, self.w_o, self.q_norm, self.k_norm) if t is not None]

    def stack_norms(self, num_heads: int, num_kv_heads: int) -> None:
        if self.q_norm is not None:
            dim = self.q_norm.shape[0]
            self.qk_norm = torch.cat(
                [self.q_norm.expand(num_heads, dim), self.k_norm.expand(num_kv_heads, dim)]
            ).contiguous()


@dataclass(frozen=True)
class GQAShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    qk_norm: str  # "none" | "before_rope" | "after_rope"


def _decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: list[Segment],
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
) -> torch.Tensor:
    """One new row per segment: q [B, H, D], k/v [B, KVH, D] -> [B, H, D]. Two batched matmuls
    per sequence over its own cache, query heads grouped by KV head (fewer ops than SDPA's
    general path, which dominates at one query row)."""
    num_kv, dim = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    for i, (seg, (k_cache, v_cache)) in enumerate(zip(segments, caches, strict=True)):
        end = seg.start + 1
        k_cache[:, seg.start] = k[i]
        v_cache[:, seg.start] = v[i]
        qg = q[i].view(num_kv, -1, dim)  # [KVH, group, D]
        probs = torch.bmm(qg, k_cache[:, :end].transpose(1, 2)).mul_(scale).softmax(-1)
        out[i] = torch.bmm(probs, v_cache[:, :end]).view(-1, dim)  # [H, D]
    return out


def gqa_attention(
    w: GQAWeights,
    x: torch.Tensor,
    shape: GQAShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    segments: list[Segment],
    caches: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """x [N, hidden] (already input-normed) -> attention output [N, hidden]; writes new K/V into
    each segment's cache (K, V) [KVH, cap, D]."""
    n = x.shape[0]
    num_heads, num_kv, dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    qkv = linear(x, w.w_qkv)  # [N, (H + 2KVH) * D]
    qk = qkv[:, : (num_heads + num_kv) * dim].view(n, num_heads + num_kv, dim)
    v = qkv[:, (num_heads + num_kv) * dim :].view(n, num_kv, dim)
    if shape.qk_norm == "before_rope":
        qk = head_rms(qk, w.q_norm, w.k_norm, w.qk_norm, num_heads, shape.eps)
    qk = apply_rope(qk, cos, sin)  # q and k heads rotated together
    if shape.qk_norm == "after_rope":
        qk = head_rms(qk, w.q_norm, w.k_norm, w.qk_norm, num_heads, shape.eps)
    attend = _decode_attention if n == len(segments) else attention  # all decode rows?
    o = attend(qk[:, :num_heads], qk[:, num_heads:], v, segments, caches, dim**-0.5)
    return linear(o.reshape(n, num_heads * dim), w.w_o)
