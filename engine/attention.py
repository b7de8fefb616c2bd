"""Grouped-query attention over a packed batch of sequence segments, for every dense and GQA MoE
family (Llama, Qwen2, Qwen3, Hunyuan, dots1; DeepSeek-V3's MLA is `engine.moe.mla`).

Rows of the batch are the tokens of several sequences laid end to end; `Segment` says which rows
belong to which sequence's KV blocks and at which position they start. A prefill is one segment
of T rows, a decode step is B segments of one row each. Projections cover every row at once; only
attention loops over segments, each reading exactly its own length of KV: nothing is padded.

Per-head q/k RMSNorm comes in three orders (`Geometry.qk_norm`): none (Llama, Qwen2), before RoPE
(Qwen3, dots1), after RoPE (Hunyuan-A13B's `query_layernorm`, so its cache holds normalised K).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ruyiflow.engine.kv_blocks import (
    BlockKV,
    attend_blocks,
    key_views,
    read_positions,
    write_positions,
)
from ruyiflow.engine.ops import head_rms, linear
from ruyiflow.engine.rope import apply_rope

if TYPE_CHECKING:  # both carry w_qkv, b_qkv, w_o, q_norm, k_norm
    from ruyiflow.engine.device_kv import DeviceKV
    from ruyiflow.engine.layers import LayerWeights
    from ruyiflow.engine.moe.attention import GQAWeights

QK_NORMS = ("none", "before_rope", "after_rope")


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
    qk_norm: str = "none"

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")


def causal_mask(num_rows: int, start: int) -> torch.Tensor:
    """[T, start+T] bool: row t may attend to keys 0..start+t."""
    keys = torch.arange(start + num_rows)
    return keys[None, :] <= (start + torch.arange(num_rows))[:, None]


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: list[Segment],
    caches: list[BlockKV],
    scale: float,
) -> torch.Tensor:
    """q [N, H, D], k/v [N, KVH, D] for new rows of any segments -> [N, H, D]. Writes the new
    K/V into each segment's cache and attends causally over it with SDPA."""
    out = torch.empty_like(q)
    for seg, kv in zip(segments, caches, strict=True):
        rows = slice(seg.row, seg.row + seg.num_rows)
        end = seg.start + seg.num_rows
        write_positions(kv.k, kv.block_size, seg.start, k[rows].transpose(0, 1), axis=1)
        write_positions(kv.v, kv.block_size, seg.start, v[rows].transpose(0, 1), axis=1)
        q_seg = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        k_seg = read_positions(kv.k, kv.block_size, end, axis=1).unsqueeze(0)  # [1, KVH, L, D]
        v_seg = read_positions(kv.v, kv.block_size, end, axis=1).unsqueeze(0)
        if seg.num_rows == 1:
            o = F.scaled_dot_product_attention(q_seg, k_seg, v_seg, scale=scale, enable_gqa=True)
        elif seg.start == 0:
            o = F.scaled_dot_product_attention(
                q_seg, k_seg, v_seg, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            mask = causal_mask(seg.num_rows, seg.start).to(q.device)
            o = F.scaled_dot_product_attention(
                q_seg, k_seg, v_seg, attn_mask=mask, scale=scale, enable_gqa=True
            )
        out[rows] = o[0].transpose(0, 1)
    return out


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: list[Segment],
    caches: list[BlockKV],
    scale: float,
) -> torch.Tensor:
    """One new row per segment: q [B, H, D], k/v [B, KVH, D] -> [B, H, D]. Two batched matmuls
    per sequence over views of its own cache, query heads grouped by KV head (fewer ops than
    SDPA's general path, which dominates at one query row on CPU); a sequence longer than one
    block attends block by block (`kv_blocks.attend_blocks`), still over views."""
    num_kv, dim = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    for i, (seg, kv) in enumerate(zip(segments, caches, strict=True)):
        end = seg.start + 1
        b, o = divmod(seg.start, kv.block_size)
        kv.k[b][:, o] = k[i]
        kv.v[b][:, o] = v[i]
        qg = q[i].view(num_kv, -1, dim)  # [KVH, group, D]
        if b == 0:
            probs = torch.bmm(qg, kv.k[0][:, :end].transpose(1, 2)).mul_(scale).softmax(-1)
            out[i] = torch.bmm(probs, kv.v[0][:, :end]).view(-1, dim)  # [H, D]
        else:
            keys = key_views(kv.k, kv.block_size, end)
            values = key_views(kv.v, kv.block_size, end)
            out[i] = attend_blocks(qg, keys, values, scale).view(-1, dim)
    return out


def gqa_attention(
    w: LayerWeights | GQAWeights,
    x: torch.Tensor,
    geo: Geometry,
    cos: torch.Tensor,
    sin: torch.Tensor,
    segments: list[Segment],
    caches: list[BlockKV] | DeviceKV,
) -> torch.Tensor:
    """x [N, hidden] (already input-normed) -> attention output [N, hidden]; writes the new K/V
    into each segment's cache (block views per segment, or the device path's pages)."""
    n = x.shape[0]
    num_heads, num_kv, dim = geo.num_heads, geo.num_kv_heads, geo.head_dim
    qkv = linear(x, w.w_qkv, w.b_qkv)  # [N, (H + 2KVH) * D]
    qk = qkv[:, : (num_heads + num_kv) * dim].view(n, num_heads + num_kv, dim)
    v = qkv[:, (num_heads + num_kv) * dim :].view(n, num_kv, dim)
    if geo.qk_norm == "before_rope":
        qk = head_rms(qk, w.q_norm, w.k_norm, num_heads, geo.eps)
    qk = apply_rope(qk, cos, sin)  # q and k heads rotated together
    if geo.qk_norm == "after_rope":
        qk = head_rms(qk, w.q_norm, w.k_norm, num_heads, geo.eps)
    q, k = qk[:, :num_heads], qk[:, num_heads:]
    if isinstance(caches, list):
        attend = decode_attention if n == len(segments) else prefill_attention  # all decode?
        o = attend(q, k, v, segments, caches, dim**-0.5)
    else:
        o = caches.attend(q, k, v, segments, dim**-0.5)
    return linear(o.reshape(n, num_heads * dim), w.w_o)
