"""DeepSeek-V3 multi-head latent attention (MLA) with a compressed cache.

Per token (moe.md §3.3): c_q = RMSNorm(x W_qa) -> q = c_q W_qb = [q_nope | q_rope] per head;
x W_kva = [c_kv | k_rope]; c_kv = RMSNorm(c_kv); kv = c_kv W_kvb = [k_nope | v] per head; RoPE on
q_rope and the single shared k_rope; K = [k_nope | k_rope], softmax scale from
`engine.moe.rope.softmax_scale` (yarn mscale² included).

The cache keeps only [c_kv | k_rope] per token and layer. Two ways to attend over it:
- expanded (prefill chunks, several rows): K/V of the whole prefix from c_kv W_kvb, then MHA;
- absorbed (decode, one row): W_UK folds into the query (q_lat = q_nope W_UK, [H, kv_lora_rank]) and
  W_UV into the output, so attention is one MQA head of kv_lora_rank + rope dims over the cache and
  no per-head K/V is ever materialised. The same values as expanded, in another summation order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ruyiflow.engine.attention import Segment, causal_mask
from ruyiflow.engine.kv_blocks import LatentBlocks, attend_blocks, read_positions, write_positions
from ruyiflow.engine.moe.config import LATENT_NORM_EPS, MLAConfig
from ruyiflow.engine.ops import linear, rms
from ruyiflow.engine.rope import apply_rope

if TYPE_CHECKING:
    from ruyiflow.engine.device_kv import DeviceLatentKV


@dataclass
class MLAWeights:
    w_in: torch.Tensor  # [q_rows + kv_lora_rank + rope, hidden]: q_a (or q) and kv_a fused
    q_norm: torch.Tensor | None  # [q_lora_rank] (None without q LoRA)
    w_qb: torch.Tensor | None  # [H * qk_head_dim, q_lora_rank]
    kv_norm: torch.Tensor  # [kv_lora_rank]
    w_kvb: torch.Tensor  # [H * (nope + v), kv_lora_rank]
    w_o: torch.Tensor  # [hidden, H * v]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in vars(self).values() if t is not None]


def _split_kvb(w: MLAWeights, m: MLAConfig, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of W_kvb: W_UK [H, nope, R] and W_UV [H, v, R]."""
    per_head = w.w_kvb.view(num_heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
    return per_head[:, : m.qk_nope_head_dim], per_head[:, m.qk_nope_head_dim :]


def _expanded(
    q: torch.Tensor, latent: torch.Tensor, w: MLAWeights, m: MLAConfig, seg: Segment, scale: float
) -> torch.Tensor:
    """q [T, H, qk] (rope part rotated), latent [L, R + P] cached prefix -> [T, H, v]."""
    num_heads, length = q.shape[1], latent.shape[0]
    kv = linear(latent[:, : m.kv_lora_rank], w.w_kvb).view(length, num_heads, -1)
    k_rope = latent[:, None, m.kv_lora_rank :].expand(length, num_heads, m.qk_rope_head_dim)
    k = torch.cat([kv[..., : m.qk_nope_head_dim], k_rope], dim=-1).transpose(0, 1)  # [H, L, qk]
    v = kv[..., m.qk_nope_head_dim :].transpose(0, 1)  # [H, L, v]
    qh = q.transpose(0, 1)  # [H, T, qk]
    if seg.start == 0:
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale)
    else:
        mask = causal_mask(seg.num_rows, seg.start).to(q.device)
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
    return o.transpose(0, 1)  # [T, H, v]


def _absorbed(
    q_lat: torch.Tensor, cache: LatentBlocks, end: int, rank: int, scale: float
) -> torch.Tensor:
    """q_lat [H, R + P] (absorbed nope part | rotated rope part) for one row over the latents of
    positions 0..end-1 -> attention-weighted latent [H, R]: MQA with one shared key/value head."""
    bs = cache.block_size
    if end <= bs:  # one block: a view
        latent = cache.blocks[0][:end]  # [L, R + P]
        scores = torch.matmul(q_lat, latent.transpose(0, 1)).float() * scale  # [H, L]
        probs = scores.softmax(dim=-1).to(latent.dtype)
        return torch.matmul(probs, latent[:, :rank])  # [H, R]
    num = -(-end // bs)
    parts = [b[None] for b in cache.blocks[: num - 1]]
    parts.append(cache.blocks[num - 1][None, : end - (num - 1) * bs])  # each [1, n_i, R + P]
    values = [p[..., :rank] for p in parts]
    return attend_blocks(q_lat[None], parts, values, scale, float_scores=True)[0]


def mla_attention(
    w: MLAWeights,
    m: MLAConfig,
    x: torch.Tensor,
    num_heads: int,
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    segments: list[Segment],
    caches: list[LatentBlocks] | DeviceLatentKV,
) -> torch.Tensor:
    """x [N, hidden] (input-normed) -> [N, hidden]; appends [c_kv | k_rope] to each cache's
    blocks. Rows of one-row segments go the absorbed way, longer segments the expanded way."""
    n, rank, nope = x.shape[0], m.kv_lora_rank, m.qk_nope_head_dim
    proj = linear(x, w.w_in)  # [N, q_rows + R + P]
    q_rows = proj.shape[1] - m.latent_dim
    if w.w_qb is not None:
        q = linear(rms(proj[:, :q_rows], w.q_norm, LATENT_NORM_EPS), w.w_qb)
    else:
        q = proj[:, :q_rows]
    q = q.view(n, num_heads, m.qk_head_dim)
    latent = rms(proj[:, q_rows : q_rows + rank], w.kv_norm, LATENT_NORM_EPS)  # [N, R]
    k_rope = apply_rope(proj[:, None, q_rows + rank :], cos, sin)[:, 0]  # [N, P]
    q = torch.cat([q[..., :nope], apply_rope(q[..., nope:], cos, sin)], dim=-1)  # [N, H, qk]
    new = torch.cat([latent, k_rope], dim=-1)  # [N, R + P]
    w_uk, w_uv = _split_kvb(w, m, num_heads)
    out = x.new_empty(n, num_heads, m.v_head_dim)
    decode = [k for k, s in enumerate(segments) if s.num_rows == 1]
    if len(decode) == n:  # every row decodes (a slice: no index tensor, as CUDA graphs need)
        rows: slice | torch.Tensor = slice(None)
    elif decode:
        rows = torch.tensor([segments[k].row for k in decode], device=x.device)
    if decode:
        # q_nope W_UK per head: [H, Nd, nope] @ [H, nope, R] -> [H, Nd, R]
        q_nope_lat = torch.bmm(q[rows, :, :nope].transpose(0, 1), w_uk)
        q_lat = torch.cat([q_nope_lat, q[rows, :, nope:].transpose(0, 1)], dim=-1)  # [H, Nd, R+P]
    if isinstance(caches, list):
        o_lat = []
        for seg, cache in zip(segments, caches, strict=True):
            end = seg.start + seg.num_rows
            rows_seg = slice(seg.row, seg.row + seg.num_rows)
            write_positions(cache.blocks, cache.block_size, seg.start, new[rows_seg], axis=0)
            if seg.num_rows > 1:
                prefix = read_positions(cache.blocks, cache.block_size, end, axis=0)  # [L, R+P]
                out[rows_seg] = _expanded(q[rows_seg], prefix, w, m, seg, scale)
            else:
                o_lat.append(_absorbed(q_lat[:, len(o_lat)], cache, end, rank, scale))
        o_lat = torch.stack(o_lat, dim=1) if decode else None  # [H, Nd, R]
    else:  # the device path: paged latents, one kernel launch for every decode row
        caches.store(new)
        for k, seg in enumerate(segments):
            if seg.num_rows > 1:
                rows_seg = slice(seg.row, seg.row + seg.num_rows)
                end = seg.start + seg.num_rows
                prefix = new[rows_seg] if seg.start == 0 else caches.prefix(k, end)
                out[rows_seg] = _expanded(q[rows_seg], prefix, w, m, seg, scale)
        if decode:
            o_lat = caches.decode(q_lat.transpose(0, 1), decode, rank, scale).transpose(0, 1)
    if decode:
        # attention-weighted latent W_UV^T per head: [H, Nd, R] @ [H, R, v] -> [H, Nd, v]
        out[rows] = torch.bmm(o_lat, w_uv.transpose(1, 2)).transpose(0, 1)
    return linear(out.reshape(n, num_heads * m.v_head_dim), w.w_o)
