"""What each layer of one forward call reads and writes: the KV of its work items.

`make_step` picks the path once per call: the device path over the paged pool
(`engine.device_kv.DeviceStep`: Triton decode kernels, stores by index) when the pool's tensors
go to Triton, else `ListStep`, per-item block views (`engine.kv_blocks`) of either cache. Both
answer the same questions: a trunk layer's KV for the first `count` items (they are sorted
deepest exit first), a branch layer's for the items leaving at one exit, an MoE layer's for all,
and where boundary states go.
"""

from __future__ import annotations

from typing import Any

import torch

from ruyiflow.engine.attention import Segment
from ruyiflow.engine.batch import Work
from ruyiflow.engine.kv_blocks import BlockKV, LatentBlocks
from ruyiflow.kernels import use_triton

MIN_DEVICE_PAGE = 16  # the Triton kernels' tiles need pages of 16 positions or more


def make_step(works: list[Work], segments: list[Segment]) -> Any:
    pool = getattr(works[0].cache, "pool", None)
    if pool is not None and pool.block_size >= MIN_DEVICE_PAGE and use_triton(pool.pages):
        from ruyiflow.engine.device_kv import DeviceStep

        return DeviceStep.for_works(pool, works, segments)
    return ListStep(works, segments)


class ListStep:
    def __init__(self, works: list[Work], segments: list[Segment]):
        self.caches = [w.cache for w in works]
        self.segments = segments

    def trunk(self, layer: int, count: int) -> list[BlockKV]:
        return [c.trunk_blocks(layer) for c in self.caches[:count]]

    def branch(self, exit_layer: int, lo: int, hi: int) -> list[BlockKV]:
        return [c.branch_blocks(exit_layer) for c in self.caches[lo:hi]]

    def layer(self, index: int) -> list[BlockKV]:
        return [c.layer_blocks(index) for c in self.caches]

    def latent(self, index: int) -> list[LatentBlocks]:
        return [c.latent_blocks(index) for c in self.caches]

    def write_boundary(self, exit_layer: int, count: int, h: torch.Tensor) -> None:
        """h rows of items 0..count-1 -> their boundary states at `exit_layer`."""
        for cache, s in zip(self.caches[:count], self.segments, strict=False):
            cache.write_boundary(exit_layer, s.start, h[s.row : s.row + s.num_rows])
