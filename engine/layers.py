"""The dense decoder layer (Llama / Qwen2 / Qwen3) and what every family's forward shares:
packing work items into one batch of rows, and the norm + head on each item's last row.

A forward call lays the tokens of several sequences end to end (prefill chunks and decode rows
side by side): every projection and MLP matmul covers all rows at once; attention
(`engine.attention`) runs per sequence over its own KV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ruyiflow.engine.attention import Geometry, Segment, gqa_attention
from ruyiflow.engine.batch import Work
from ruyiflow.engine.kv_blocks import BlockKV
from ruyiflow.engine.ops import linear, rms, rms_residual
from ruyiflow.engine.rope import RopeTable

__all__ = ["Geometry", "LayerWeights", "Segment", "decoder_layer", "last_logits", "pack"]


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


def decoder_layer(
    layer: LayerWeights,
    h: torch.Tensor,
    geo: Geometry,
    cos: torch.Tensor,
    sin: torch.Tensor,
    segments: list[Segment],
    caches: list[BlockKV] | Any,  # or the device path's DeviceKV
) -> torch.Tensor:
    """h [N, hidden] residual stream in, residual stream out (pre-norm layer)."""
    x = rms(h, layer.input_norm, geo.eps)
    attn_out = gqa_attention(layer, x, geo, cos, sin, segments, caches)
    x, h = rms_residual(attn_out, h, layer.post_norm, geo.eps)
    gate_up = linear(x, layer.w_gate_up)  # [N, 2I]
    inter = gate_up.shape[-1] // 2
    return h + linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], layer.w_down)


def pack(
    works: list[Work], rope: RopeTable, embed: torch.Tensor
) -> tuple[list[Segment], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lay the work items' tokens end to end -> (segments, embeddings h [rows, hidden], cos,
    sin [rows, D]); reserves each cache for the positions it will hold."""
    segments, row = [], 0
    for w in works:
        if not w.token_ids:
            raise ValueError("a work item needs at least one token")
        w.cache.reserve(w.start + len(w.token_ids), w.exit)
        segments.append(Segment(row, len(w.token_ids), w.start))
        row += len(w.token_ids)
    ids = torch.tensor([t for w in works for t in w.token_ids], dtype=torch.long)
    if row == len(works):  # decode rows: one position each
        positions = torch.tensor([s.start for s in segments])
    else:
        positions = torch.cat([torch.arange(s.start, s.start + s.num_rows) for s in segments])
    cos, sin = rope.gather(positions)
    return segments, F.embedding(ids.to(embed.device), embed), cos, sin


def last_logits(
    h: torch.Tensor,
    segments: list[Segment],
    wanted: list[bool],
    norm: torch.Tensor,
    head: torch.Tensor,
    eps: float,
) -> list[torch.Tensor | None]:
    """float32 logits [vocab] of each segment's last row where wanted (else None): the final
    norm and the head run only on those rows."""
    if len(segments) == h.shape[0] and all(wanted):  # decode rows: every row is a last row
        return list(linear(rms(h, norm, eps), head).float().unbind(0))
    want = [k for k, is_wanted in enumerate(wanted) if is_wanted]
    result: list[torch.Tensor | None] = [None] * len(segments)
    if want:
        last = torch.tensor([segments[k].row + segments[k].num_rows - 1 for k in want])
        last = last.to(h.device)
        logits = linear(rms(h[last], norm, eps), head).float()  # [len(want), vocab]
        for j, k in enumerate(want):
            result[k] = logits[j]
    return result
