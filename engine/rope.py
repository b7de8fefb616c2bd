"""Rotary position embeddings: cos/sin tables computed in float32 exactly as Hugging Face does,
cached per model and grown on demand."""

from __future__ import annotations

import math

import torch

from ruyiflow.engine.config import RopeConfig


def inv_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim/2] float32 inverse frequencies, with linear or llama3 scaling applied."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponent)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RopeTable:
    """cos/sin [max_len, head_dim] in the activation dtype on the model's device; rows are
    gathered by position (computed on the CPU in float32, then moved: the same values anywhere)."""

    def __init__(
        self,
        inv_freq: torch.Tensor,
        dtype: torch.dtype,
        attention_factor: float = 1.0,
        size: int = 4096,
        device: torch.device | str = "cpu",
    ):
        self.inv_freq = inv_freq  # [D/2] float32
        self.attention_factor = attention_factor  # YaRN scales cos/sin; 1.0 elsewhere (exact)
        self.dtype = dtype
        self.device = torch.device(device)
        self._build(size)

    def _build(self, size: int) -> None:
        positions = torch.arange(size, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq)  # [size, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [size, D] (rotate_half layout)
        self.cos = (emb.cos() * self.attention_factor).to(self.dtype).to(self.device)
        sin = emb.sin() * self.attention_factor
        half = sin.shape[-1] // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]: one op fewer per call, and
        # bitwise the same (negating a factor is exact).
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.dtype)
        self.sin = self.sin.to(self.device)

    def reserve(self, size: int) -> None:
        """Rows for positions 0..size-1 (device callers gather without a host check)."""
        if size > self.cos.shape[0]:
            self._build(max(size, 2 * self.cos.shape[0]))

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] int64 on the CPU -> (cos, sin) each [N, D] on the table's device."""
        self.reserve(int(positions.max()) + 1)
        if self.device.type != "cpu":
            positions = positions.to(self.device, non_blocking=True)
        return self.cos[positions], self.sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D]; cos/sin [N, D] from `RopeTable.gather` (sin sign-folded). Same values
    as HF `apply_rotary_pos_emb`: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return x * cos.unsqueeze(1) + torch.roll(x, half, dims=-1) * sin.unsqueeze(1)
