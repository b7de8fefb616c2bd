"""MoEModel: a Mixture-of-Experts decoder with the interface of `engine.model.FamilyModel`, so the
continuous-batching `engine.engine.Engine` drives it unchanged.

One exit (the last layer). `forward(works)` packs the tokens of several sequences into one batch
(rows of a prefill chunk and single decode rows side by side); every projection, router and expert
matmul covers all rows, attention runs per sequence over its own cache. Layers are pre-norm:
`h += attn(rmsnorm(h)); h += ffn(rmsnorm(h))`, then the final norm and the head on each
sequence's last row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ruyiflow.engine.attention import Geometry, Segment, gqa_attention
from ruyiflow.engine.batch import Work
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.kv_pool import PageGeometry
from ruyiflow.engine.kv_step import make_step
from ruyiflow.engine.layers import last_logits, pack
from ruyiflow.engine.moe.attention import GQAWeights
from ruyiflow.engine.moe.cache import MoECache
from ruyiflow.engine.moe.config import MoEConfig
from ruyiflow.engine.moe.mla import MLAWeights, mla_attention
from ruyiflow.engine.moe.moe_block import DenseFFN, MoEFFN
from ruyiflow.engine.moe.rope import rope_table, softmax_scale
from ruyiflow.engine.ops import rms, rms_residual
from ruyiflow.engine.paging import PageLayout


@dataclass
class MoELayer:
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    attn: GQAWeights | MLAWeights
    ffn: DenseFFN | MoEFFN

    def tensors(self) -> list[torch.Tensor]:
        return [self.input_norm, self.post_norm, *self.attn.tensors(), *self.ffn.tensors()]

    def active_parameters(self) -> int:
        norms_attn = [self.input_norm, self.post_norm, *self.attn.tensors()]
        count = sum(t.numel() for t in norms_attn)
        if isinstance(self.ffn, MoEFFN):
            return count + self.ffn.active_parameters()
        return count + sum(t.numel() for t in self.ffn.tensors())


class MoEModel:
    def __init__(
        self,
        config: MoEConfig,
        embed: torch.Tensor,
        layers: list[MoELayer],
        norm: torch.Tensor,
        head: torch.Tensor,
        dtype: torch.dtype,
    ):
        self.config = config
        self.dtype = dtype
        self.embed = embed  # [vocab, hidden]
        self.layers = layers
        self.norm = norm  # [hidden]
        self.head = head  # [vocab, hidden]; the embedding itself when tied
        self.device = embed.device
        self.rope = rope_table(config.rope, dtype, self.device)
        c = config
        if c.mla is not None:
            self.scale = softmax_scale(c.rope, c.mla.qk_head_dim)
        else:
            self.gqa = Geometry(c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps, c.qk_norm)

    def new_cache(self) -> MoECache:
        """A contiguous cache (the simple path; the runner serves from a paged pool)."""
        c = self.config
        if c.mla is not None:
            return MoECache.for_mla(c.num_layers, c.mla.latent_dim, self.dtype, self.device)
        return MoECache.for_gqa(c.num_layers, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    def page_geometry(self, block_size: int) -> PageGeometry:
        c = self.config
        if c.mla is not None:
            return PageGeometry(block_size, latent_dim=c.mla.latent_dim)
        return PageGeometry(block_size, c.num_kv_heads, c.head_dim)

    def page_layout(self, block_size: int) -> PageLayout:
        """One slot per layer, no exits to move between."""
        return PageLayout(block_size, self.config.num_layers)

    # -- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, works: list[Work]) -> list[torch.Tensor | None]:
        """float32 logits [vocab] of each item's last token (None where not wanted), in the
        order given; updates each cache's length."""
        for w in works:
            if w.exit != self.config.last_exit:
                self.config.check_exit(w.exit)
            if w.start != w.cache.length:
                raise InvalidRequest(
                    f"work starts at {w.start} but its cache holds {w.cache.length} positions"
                )
        segments, h, cos, sin = pack(works, self.rope, self.embed)  # h [rows, hidden]
        step = make_step(works, segments)
        exits = [w.exit for w in works]
        logits = self.run_layers(h, cos, sin, segments, exits, [w.want_logits for w in works], step)
        for w in works:
            w.cache.length = w.start + len(w.token_ids)
        return logits

    def run_layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        segments: list[Segment],
        exits: list[int],
        wanted: list[bool],
        step: Any,
    ) -> list[torch.Tensor | None]:
        """Every layer of a packed batch, then the head on the wanted rows: device ops only
        (what a CUDA graph of a decode step captures). `exits` are all the last layer."""
        eps = self.config.rms_norm_eps
        for i, layer in enumerate(self.layers):
            x = rms(h, layer.input_norm, eps)
            if isinstance(layer.attn, MLAWeights):
                a = mla_attention(
                    layer.attn,
                    self.config.mla,
                    x,
                    self.config.num_heads,
                    self.scale,
                    cos,
                    sin,
                    segments,
                    step.latent(i),
                )
            else:
                a = gqa_attention(layer.attn, x, self.gqa, cos, sin, segments, step.layer(i))
            x, h = rms_residual(a, h, layer.post_norm, eps)
            h = h + layer.ffn(x)
        return last_logits(h, segments, wanted, self.norm, self.head, eps)

    def switch_exit(self, cache: MoECache, from_exit: int, to_exit: int) -> None:
        """Only the single exit exists, so the only valid move is staying there."""
        self.config.check_exit(from_exit)
        self.config.check_exit(to_exit)

    # -- facts ----------------------------------------------------------------------------------
    def branch_parameters(self, exit_layer: int) -> int:
        """Parameters one token touches at the exit: embedding, attention, norms, head, and per
        MoE layer the router, top-k routed experts and shared experts (not every expert)."""
        self.config.check_exit(exit_layer)
        count = self.embed.numel() + self.norm.numel()
        count += sum(layer.active_parameters() for layer in self.layers)
        if self.head.data_ptr() != self.embed.data_ptr():
            count += self.head.numel()
        return count

    def num_parameters(self) -> int:
        """Every parameter held, all experts included."""
        count = self.embed.numel() + self.norm.numel()
        count += sum(t.numel() for layer in self.layers for t in layer.tensors())
        return count + (self.head.numel() if self.head.data_ptr() != self.embed.data_ptr() else 0)

    def kv_bytes_per_token(self) -> int:
        """Cache bytes per token over all layers (latent + rope key for MLA)."""
        return self.config.kv_values_per_token() * self.embed.element_size()
