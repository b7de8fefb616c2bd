"""Familial dense model: one embedding, N trunk layers, one branch (layer, norm, head) per exit.

Exit e runs trunk `layers[0:e]`, then its branch layer (`eelayers[j]`, or `layers[N-1]` for the
last exit), its norm and its head. A forward call packs work items of several sequences, possibly
at different exits: items are sorted by exit, deepest first, so at trunk layer i the items still
running form a prefix of the rows and the batch simply shrinks as shallow items branch off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ruyiflow.engine.batch import Work  # noqa: F401 (re-exported)
from ruyiflow.engine.config import ModelConfig
from ruyiflow.engine.kv_cache import SequenceCache
from ruyiflow.engine.layers import (
    Geometry,
    LayerWeights,
    Segment,
    decoder_layer,
    last_logits,
    pack,
)
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
        self.rope = RopeTable(inv_frequencies(config.rope, config.head_dim), dtype)

    def new_cache(self) -> SequenceCache:
        c = self.config
        return SequenceCache(c.num_kv_heads, c.head_dim, c.hidden_size, self.dtype)

    # -- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, works: list[Work]) -> list[torch.Tensor | None]:
        """Run every work item; returns float32 logits [vocab] of each item's last token (or
        None where not wanted), in the order given. Updates each cache's length."""
        order = sorted(range(len(works)), key=lambda i: -works[i].exit)
        items = [works[i] for i in order]
        segments, h, cos, sin = pack(items, self.rope, self.embed)  # h [rows, hidden]
        logits: list[torch.Tensor | None] = [None] * len(items)
        exits = self.config.exits
        for i in range(items[0].exit + 1):
            num_ge = sum(1 for w in items if w.exit >= i)
            num_gt = sum(1 for w in items if w.exit > i)
            rows_ge = _rows(segments, num_ge)
            rows_gt = _rows(segments, num_gt)
            if i in exits:
                for w, s in zip(items[:num_ge], segments, strict=False):
                    w.cache.boundary_buf(i)[s.start : s.start + s.num_rows] = h[
                        s.row : s.row + s.num_rows
                    ]
            if num_ge > num_gt:
                done = self._branch(
                    i,
                    h[rows_gt:rows_ge],
                    cos[rows_gt:rows_ge],
                    sin[rows_gt:rows_ge],
                    items[num_gt:num_ge],
                    segments[num_gt:num_ge],
                    rows_gt,
                )
                for k, out in enumerate(done):
                    logits[num_gt + k] = out
            if num_gt == 0:
                break
            caches = [w.cache.trunk_kv(i) for w in items[:num_gt]]
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
        for w in items:
            w.cache.length = w.start + len(w.token_ids)
        result: list[torch.Tensor | None] = [None] * len(works)
        for k, i in enumerate(order):
            result[i] = logits[k]
        return result

    def _branch(
        self,
        exit_layer: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        items: list[Work],
        segments: list[Segment],
        row0: int,
    ) -> list[torch.Tensor | None]:
        """Branch layer + norm + head for items leaving at `exit_layer`; h holds only their rows."""
        branch = self.branches[exit_layer]
        local = [Segment(s.row - row0, s.num_rows, s.start) for s in segments]
        caches = [w.cache.branch_kv(exit_layer) for w in items]
        out = decoder_layer(branch.layer, h, self.geo, cos, sin, local, caches)
        wanted = [w.want_logits for w in items]
        return last_logits(out, local, wanted, branch.norm, branch.head, self.config.rms_norm_eps)

    # -- moving a running sequence between exits ---------------------------------------------
    @torch.inference_mode()
    def switch_exit(self, cache: SequenceCache, from_exit: int, to_exit: int) -> None:
        """Make `cache` (valid for `from_exit`) valid for `to_exit` without recomputing what is
        valid: deeper runs trunk layers from..to-1 and the new branch layer over the stored
        boundary states; shallower fills only the new branch layer's KV."""
        self.config.check_exit(to_exit)
        length = cache.length
        if length == 0:
            cache.drop_above(to_exit)
            return
        if to_exit == from_exit and to_exit in cache.branch:
            return
        start_exit = min(from_exit, to_exit)
        if start_exit not in cache.boundary:
            raise ValueError(f"cache has no boundary states at exit {start_exit}")
        h = cache.boundary[start_exit][:length]
        seg = [Segment(0, length, 0)]
        cos, sin = self.rope.gather(torch.arange(length))
        for i in range(from_exit, to_exit):  # empty unless moving deeper
            if i in self.config.exits and i != from_exit:
                cache.boundary_buf(i)[:length] = h
            h = decoder_layer(self.layers[i], h, self.geo, cos, sin, seg, [cache.trunk_kv(i)])
        if to_exit > from_exit:
            cache.boundary_buf(to_exit)[:length] = h
        decoder_layer(
            self.branches[to_exit].layer, h, self.geo, cos, sin, seg, [cache.branch_kv(to_exit)]
        )
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
