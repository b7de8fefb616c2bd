"""RoPE tables for the MoE families: default, linear, Hunyuan's static NTK-alpha and YaRN (with its
cos/sin attention factor), computed in float32 exactly as transformers computes them.

Tables use the rotate_half layout and the sign-folded sin of `engine.rope`, so `apply_rope` from
there applies. DeepSeek's interleaved layout is handled at load time by permuting the rope rows of
the q/k projections (`deinterleave_rows`): rotating the de-interleaved vector with rotate_half
gives the same values as transformers' `apply_rotary_pos_emb_interleave`.
"""

from __future__ import annotations

import math

import torch

from ruyiflow.engine.moe.config import MoERope
from ruyiflow.engine.rope import RopeTable


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_frequencies(rope: MoERope) -> tuple[torch.Tensor, float]:
    """([dim/2] float32 inverse frequencies, cos/sin attention factor)."""
    dim = rope.dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if rope.rope_type == "ntk_alpha":
        base = rope.theta * rope.alpha ** (dim / (dim - 2))
        return 1.0 / (base**exponent), 1.0
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "default":
        return inv_freq, 1.0
    # yarn: blend interpolated (1/factor) and extrapolated frequencies over a linear ramp
    factor = rope.factor
    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            numerator = _yarn_mscale(factor, rope.mscale)
            attention = numerator / _yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        span = rope.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(span) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    interpolated, extrapolated = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    inv_freq = interpolated * (1 - extrapolation) + extrapolated * extrapolation
    return inv_freq, float(attention)


def softmax_scale(rope: MoERope, qk_head_dim: int) -> float:
    """Attention scale: 1/sqrt(d), times mscale² for DeepSeek scaled RoPE (`yarn_apply_mscale`)."""
    scale = qk_head_dim**-0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:
        scale *= _yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def deinterleave_rows(weight: torch.Tensor, groups: int, rope_dim: int) -> torch.Tensor:
    """weight [groups * d, in] whose last `rope_dim` rows of each group are interleaved pairs
    (x0, x1), (x2, x3), ...: reorder those rows to (x0, x2, ..., x1, x3, ...)."""
    rows = weight.view(groups, -1, weight.shape[-1])  # [groups, d, in]
    order = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])
    rope_rows = rows[:, rows.shape[1] - rope_dim :][:, order]
    return torch.cat([rows[:, : rows.shape[1] - rope_dim], rope_rows], dim=1).reshape(weight.shape)


def rope_table(rope: MoERope, dtype: torch.dtype, device: torch.device | str = "cpu") -> RopeTable:
    """cos/sin table for an MoE family's RoPE (NTK-alpha / YaRN frequencies and factor)."""
    inv_freq, attention_factor = inv_frequencies(rope)
    return RopeTable(inv_freq, dtype, attention_factor, device=device)
