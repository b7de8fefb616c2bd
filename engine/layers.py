"""Dense decoder layer (Llama / Qwen2 / Qwen3) over a packed batch of sequence segments.

Rows of `h` are the tokens of several sequences laid end to end; `Segment` says which rows belong
to which sequence's KV buffers and at which position they start. A prefill is one segment of T
rows, a decode step is B segments of one row each; both run the same code, and every projection
and MLP matmul covers all rows at once. Only attention loops over segments, each reading exactly
its own `length` of KV: nothing is padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ruyiflow.engine.rope import apply_rope
from ruyiflow.kernels import rms_norm
from ruyiflow.kernels.cpu_gemv import cpu_linear as linear


@dataclass
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up fused at load time (fewer, larger matmuls)."""

    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    w_qkv: torch.Tensor  # [(H + 2*KVH) * D, hidden]
    b_qkv: torch.Tensor | None  # [(H + 2*KVH) * D] (Qwen2)
    w_o: torch.Tensor  # [hidden, H * D]
    q_norm: torch.Tensor | None  # [D] (Qwen3)
    k_norm: torch.Tensor | None  # [D]
    w_gate_up: torch.Tensor  # [2 * I, hidden]; rows [0:I] gate, [I:2I] up
    w_down: torch.Tensor  # [hidden, I]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if t is not None]


@dataclass(frozen=True)
class Segment:
    row: int  # first row in the packed batch
    num_rows: int
    start: int  # position of the first row (= KV entries already valid before it)


@dataclass(frozen=True)
class Geometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float


def _causal_mask(num_rows: int, start: int) -> torch.Tensor:
    """[T, start+T] bool: row t may attend to keys 0..start+t."""
    keys = torch.arange(start + num_rows)
    return keys[None, :] <= (start + torch.arange(num_rows))[:, None]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: list[Segment],
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    scale: float,
) -> torch.Tensor:
    """q [N, H, D], k/v [N, KVH, D] for new rows; caches[i] = (K, V) [KVH, cap, D] of segment i.

    Writes the new K/V into each cache, attends causally over the cache, returns [N, H, D].
    """
    out = torch.empty_like(q)
    for seg, (k_cache, v_cache) in zip(segments, caches, strict=True):
        rows = slice(seg.row, seg.row + seg.num_rows)
        end = seg.start + seg.num_rows
        k_cache[:, seg.start : end] = k[rows].transpose(0, 1)
        v_cache[:, seg.start : end] = v[rows].transpose(0, 1)
        q_seg = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        k_seg = k_cache[:, :end].unsqueeze(0)  # [1, KVH, L, D]
        v_seg = v_cache[:, :end].unsqueeze(0)
        if seg.num_rows == 1:
            o = F.scaled_dot_product_attention(q_seg, k_seg, v_seg, scale=scale, enable_gqa=True)
        elif seg.start == 0:
            o = F.scaled_dot_product_attention(
                q_seg, k_seg, v_seg, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            mask = _causal_mask(seg.num_rows, seg.start)
            o = F.scaled_dot_product_attention(
                q_seg, k_seg, v_seg, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[rows] = o[0].transpose(0, 1)
    return out


def _head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x, weight, eps)[0]


def decoder_layer(
    layer: LayerWeights,
    h: torch.Tensor,
    geo: Geometry,
    cos: torch.Tensor,
    sin: torch.Tensor,
    segments: list[Segment],
    caches: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """h [N, hidden] residual stream in, residual stream out (pre-norm layer)."""
    n = h.shape[0]
    H, KVH, D = geo.num_heads, geo.num_kv_heads, geo.head_dim
    x, _ = rms_norm(h, layer.input_norm, geo.eps)
    qkv = linear(x, layer.w_qkv, layer.b_qkv)  # [N, (H + 2KVH) * D]
    qk = qkv[:, : (H + KVH) * D].view(n, H + KVH, D)
    v = qkv[:, (H + KVH) * D :].view(n, KVH, D)
    if layer.q_norm is not None:
        qk = torch.cat(
            [
                _head_norm(qk[:, :H], layer.q_norm, geo.eps),
                _head_norm(qk[:, H:], layer.k_norm, geo.eps),
            ],
            dim=1,
        )
    qk = apply_rope(qk, cos, sin)  # q and k heads rotated together
    q, k = qk[:, :H], qk[:, H:]
    o = attention(q, k, v, segments, caches, D**-0.5)  # [N, H, D]
    attn_out = linear(o.reshape(n, H * D), layer.w_o)
    x, h = rms_norm(attn_out, layer.post_norm, geo.eps, residual=h)
    gate_up = linear(x, layer.w_gate_up)  # [N, 2I]
    inter = gate_up.shape[-1] // 2
    mlp = linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], layer.w_down)
    return h + mlp
