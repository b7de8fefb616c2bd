"""Differentiable branch forward over whole sequences, with optional low-rank (LoRA) deltas.

The serving path (`engine.layers.decoder_layer`) writes K/V into caches and runs under inference
mode; training needs autograd, so this module runs the same math on packed rows of complete
sequences (one causal attention per sequence, nothing padded). With no deltas it equals the
serving branch (tested); `ruyiflow.engine.overlay.merged_branch` folds trained deltas into plain
weights at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ruyiflow.engine.layers import Geometry
from ruyiflow.engine.model import Branch
from ruyiflow.engine.overlay import PROJECTIONS, projection_weight
from ruyiflow.engine.rope import RopeTable, apply_rope
from ruyiflow.kernels import rmsnorm_reference


class LoraBranch(torch.nn.Module):
    """Trainable deltas for one exit: A [r, in] and B [out, r] per projection (B starts at
    zero, so training starts from the untrained copy) and the three norm vectors in full."""

    def __init__(
        self,
        branch: Branch,
        geo: Geometry,
        rank: int,
        alpha: float,
        generator: torch.Generator,
    ):
        super().__init__()
        self.rank = rank
        self.scale = alpha / rank
        self.lora_a = torch.nn.ParameterDict()
        self.lora_b = torch.nn.ParameterDict()
        for name in PROJECTIONS:
            out_dim, in_dim = projection_weight(branch.layer, name, geo).shape
            # kaiming-uniform bound for A (as PEFT), drawn from the run's seeded generator
            bound = 1.0 / math.sqrt(in_dim)
            a = (torch.rand(rank, in_dim, generator=generator) * 2 - 1) * bound
            self.lora_a[name] = torch.nn.Parameter(a)
            self.lora_b[name] = torch.nn.Parameter(torch.zeros(out_dim, rank))
        self.norms = torch.nn.ParameterDict(
            {
                "input_norm": torch.nn.Parameter(branch.layer.input_norm.detach().float().clone()),
                "post_norm": torch.nn.Parameter(branch.layer.post_norm.detach().float().clone()),
                "norm": torch.nn.Parameter(branch.norm.detach().float().clone()),
            }
        )

    def delta(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] -> scale * x A^T B^T [N, out]."""
        return (x @ self.lora_a[name].T) @ self.lora_b[name].T * self.scale

    def factors(self) -> tuple[dict[str, torch.Tensor], ...]:
        """Detached (A, B, norms) dicts, as an overlay stores them."""
        a = {k: p.detach().clone() for k, p in self.lora_a.items()}
        b = {k: p.detach().clone() for k, p in self.lora_b.items()}
        return a, b, {k: p.detach().clone() for k, p in self.norms.items()}


@dataclass
class BranchWeights:
    """What branch_forward reads: a branch (layer, norm) plus optional deltas."""

    branch: Branch
    lora: LoraBranch | None = None

    def norm(self, name: str) -> torch.Tensor:
        if self.lora is not None:
            return self.lora.norms[name]
        return self.branch.norm if name == "norm" else getattr(self.branch.layer, name)

    def linear(self, field: str, x: torch.Tensor, geo: Geometry) -> torch.Tensor:
        layer = self.branch.layer
        bias = layer.b_qkv if field == "w_qkv" else None
        out = F.linear(x, getattr(layer, field), bias)
        if self.lora is None:
            return out
        names = [n for n, (f, _) in PROJECTIONS.items() if f == field]
        return out + torch.cat([self.lora.delta(n, x) for n in names], dim=-1)


def branch_forward(
    weights: BranchWeights,
    h: torch.Tensor,
    lengths: list[int],
    geo: Geometry,
    rope: RopeTable,
) -> torch.Tensor:
    """Boundary states h [N, hidden] of whole sequences laid end to end (`lengths`, each from
    position 0) -> branch output after the exit norm, [N, hidden] float32."""
    n = h.shape[0]
    H, KVH, D = geo.num_heads, geo.num_kv_heads, geo.head_dim
    layer = weights.branch.layer
    positions = torch.cat([torch.arange(t) for t in lengths])
    cos, sin = rope.gather(positions)  # [N, D] each
    x, _ = rmsnorm_reference(h, weights.norm("input_norm"), geo.eps)
    qkv = weights.linear("w_qkv", x, geo)  # [N, (H + 2KVH) * D]
    qk = qkv[:, : (H + KVH) * D].view(n, H + KVH, D)
    v = qkv[:, (H + KVH) * D :].view(n, KVH, D)
    if layer.q_norm is not None:
        qk = torch.cat(
            [
                rmsnorm_reference(qk[:, :H], layer.q_norm, geo.eps)[0],
                rmsnorm_reference(qk[:, H:], layer.k_norm, geo.eps)[0],
            ],
            dim=1,
        )
    qk = apply_rope(qk, cos, sin)
    q, k = qk[:, :H], qk[:, H:]
    outs, row = [], 0
    for t in lengths:  # causal attention within each sequence: [1, heads, t, D]
        rows = slice(row, row + t)
        o = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            k[rows].transpose(0, 1).unsqueeze(0),
            v[rows].transpose(0, 1).unsqueeze(0),
            is_causal=True,
            scale=D**-0.5,
            enable_gqa=True,
        )
        outs.append(o[0].transpose(0, 1).reshape(t, H * D))
        row += t
    attn_out = weights.linear("w_o", torch.cat(outs), geo)
    x, h = rmsnorm_reference(attn_out, weights.norm("post_norm"), geo.eps, residual=h)
    gate_up = weights.linear("w_gate_up", x, geo)  # [N, 2I]
    inter = gate_up.shape[-1] // 2
    mlp = weights.linear("w_down", F.silu(gate_up[:, :inter]) * gate_up[:, inter:], geo)
    out, _ = rmsnorm_reference(h + mlp, weights.norm("norm"), geo.eps)
    return out.float()
