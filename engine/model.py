"""Familial dense model: one embedding, N trunk layers, one branch (layer, norm, head) per exit.

Exit e runs trunk `layers[0:e]`, then its branch layer (`eelayers[j]`, or `layers[N-1]` for the
last exit), its norm and its head. A forward call packs work items of several sequences, possibly
at different exits: items are sorted by exit, deepest first, so at trunk layer i the items still
running form a prefix of the rows and the batch simply shrinks as shallow items branch off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ruyiflow.engine.batch import Work  # noqa: F401 (re-exported)
from ruyiflow.engine.config import ModelConfig
from ruyiflow.engine.kv_cache import SequenceCache
from ruyiflow.engine.kv_pool import PagedCache, PageGeometry
from ruyiflow.engine.kv_step import make_step
from ruyiflow.engine.layers import (
    Geometry,
    LayerWeights,
    Segment,
    decoder_layer,
    last_logits,
    pack,
)
from ruyiflow.engine.paging import PageLayout
from ruyiflow.engine.rope import RopeTable, inv_frequencies


@dataclass
class Branch:
    layer: LayerWeights
    norm: torch.Tensor  # [hidden]
    head: torch.Tensor  # [vocab, hidden]


class FamilyModel:
    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        branches: dict[int, Branch],
        dtype: torch.dtype,
    ):
        self.config = config
        self.dtype = dtype
        self.embed = embed  # [vocab, hidden]
        self.layers = layers
        self.branches = branches
        qk_norm = "before_rope" if config.qk_norm else "none"  # Qwen3
        self.geo = Geometry(
            config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps, qk_norm
        )
        self.device = embed.device
        self.rope = RopeTable(
            inv_frequencies(config.rope, config.head_dim), dtype, device=self.device
        )

    def new_cache(self) -> SequenceCache:
        """A contiguous cache (the simple path; the runner serves from a paged pool)."""
        c = self.config
        return SequenceCache(c.num_kv_heads, c.head_dim, c.hidden_size, self.dtype, self.device)

    def page_geometry(self, block_size: int) -> PageGeometry:
        c = self.config
        return PageGeometry(block_size, c.num_kv_heads, c.head_dim, hidden_size=c.hidden_size)

    def page_layout(self, block_size: int) -> PageLayout:
        """Trunk slots for layers 0..N-2; a branch and a boundary slot per exit."""
        boundary = self.page_geometry(block_size).boundary_block_size
        return PageLayout(block_size, self.config.num_layers - 1, self.config.exits, boundary)

    # -- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, works: list[Work]) -> list[torch.Tensor | None]:
        """Run every work item; returns float32 logits [vocab] of each item's last token (or
        None where not wanted), in the order given. Updates each cache's length."""
        order = sorted(range(len(works)), key=lambda i: -works[i].exit)
        items = [works[i] for i in order]
        segments, h, cos, sin = pack(items, self.rope, self.embed)  # h [rows, hidden]
        step = make_step(items, segments)
        exits = [w.exit for w in items]
        logits = self.run_layers(h, cos, sin, segments, exits, [w.want_logits for w in items], step)
        for w in items:
            w.cache.length = w.start + len(w.token_ids)
        result: list[torch.Tensor | None] = [None] * len(works)
        for k, i in enumerate(order):
            result[i] = logits[k]
        return result

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
        """The layers of a packed batch, items sorted deepest exit first: h [rows, hidden] in,
        logits of each item out. Device ops only, given the items' metadata (a CUDA graph of a
        decode step captures exactly this)."""
        logits: list[torch.Tensor | None] = [None] * len(exits)
        for i in range(exits[0] + 1):
            num_ge = sum(1 for e in exits if e >= i)
            num_gt = sum(1 for e in exits if e > i)
            rows_ge = _rows(segments, num_ge)
            rows_gt = _rows(segments, num_gt)
            if i in self.config.exits:
                step.write_boundary(i, num_ge, h)
            if num_ge > num_gt:
                done = self._branch(
                    i,
                    h[rows_gt:rows_ge],
                    cos[rows_gt:rows_ge],
                    sin[rows_gt:rows_ge],
                    step.branch(i, num_gt, num_ge),
                    wanted[num_gt:num_ge],
                    segments[num_gt:num_ge],
                    rows_gt,
                )
                logits[num_gt:num_ge] = done
            if num_gt == 0:
                break
            caches = step.trunk(i, num_gt)
            h = decoder_layer(
                self.layers[i],
                h[:rows_gt],
                self.geo,
                cos[:rows_gt],
                sin[:rows_gt],
                segments[:num_gt],
                caches,
            )
            cos, sin = cos[:rows_gt], sin[:rows_gt]
        return logits

    def _branch(
        self,
        exit_layer: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caches: Any,
        wanted: list[bool],
        segments: list[Segment],
        row0: int,
    ) -> list[torch.Tensor | None]:
        """Branch layer + norm + head for items leaving at `exit_layer`; h holds only their rows,
        `caches` their branch layer's KV."""
        branch = self.branches[exit_layer]
        local = [Segment(s.row - row0, s.num_rows, s.start) for s in segments]
        out = decoder_layer(branch.layer, h, self.geo, cos, sin, local, caches)
        return last_logits(out, local, wanted, branch.norm, branch.head, self.config.rms_norm_eps)

    # -- moving a running sequence between exits ---------------------------------------------
    @torch.inference_mode()
    def switch_exit(self, cache: SequenceCache | PagedCache, from_exit: int, to_exit: int) -> None:
        """Make `cache` (valid for `from_exit`) valid for `to_exit` without recomputing what is
        valid: deeper runs trunk layers from..to-1 and the new branch layer over the stored
        boundary states; shallower fills only the new branch layer's KV. A paged cache must
        already hold pages for `to_exit`'s slots (`BlockTable.ensure`)."""
        self.config.check_exit(to_exit)
        length = cache.length
        if length == 0:
            cache.drop_above(to_exit)
            return
        if to_exit == from_exit and to_exit in cache.branch_exits():
            return
        start_exit = min(from_exit, to_exit)
        if not cache.has_boundary(start_exit):
            raise ValueError(f"cache has no boundary states at exit {start_exit}")
        cache.reserve(length, to_exit)
        h = cache.read_boundary(start_exit, length)
        seg = [Segment(0, length, 0)]
        cos, sin = self.rope.gather(torch.arange(length))
        for i in range(from_exit, to_exit):  # empty unless moving deeper
            if i in self.config.exits and i != from_exit:
                cache.write_boundary(i, 0, h)
            h = decoder_layer(self.layers[i], h, self.geo, cos, sin, seg, [cache.trunk_blocks(i)])
        if to_exit > from_exit:
            cache.write_boundary(to_exit, 0, h)
        branch = self.branches[to_exit].layer
        decoder_layer(branch, h, self.geo, cos, sin, seg, [cache.branch_blocks(to_exit)])
        cache.drop_above(to_exit)

    # -- facts ----------------------------------------------------------------------------------
    def branch_parameters(self, exit_layer: int) -> int:
        """Parameters exit e touches: embedding, e trunk layers, branch layer, norm, head."""
        branch = self.branches[exit_layer]
        count = self.embed.numel() + branch.norm.numel()
        count += sum(t.numel() for layer in self.layers[:exit_layer] for t in layer.tensors())
        count += sum(t.numel() for t in branch.layer.tensors())
        if branch.head.data_ptr() != self.embed.data_ptr():
            count += branch.head.numel()
        return count


def _rows(segments: list[Segment], count: int) -> int:
    """Rows covered by the first `count` segments."""
    if count == 0:
        return 0
    last = segments[count - 1]
    return last.row + last.num_rows
