"""What each layer of one forward call reads and writes: the KV of its work items.

`make_step` picks the path once per call: the device path over the paged pool
(`engine.device_kv.DeviceStep`: Triton decode kernels, stores by index) when the pool's tensors
go to Triton; on a CPU pool, for a step where every item decodes one row, `CpuDecodeStep` (one
call of the C paged attention per layer, `kernels.cpu_attention`, which also stores the new K/V);
else `ListStep`, per-item block views (`engine.kv_blocks`) of either cache. All three answer the
same questions: a trunk layer's KV for the first `count` items (they are sorted
deepest exit first), a branch layer's for the items leaving at one exit, an MoE layer's for all,
and where boundary states go.
"""

from __future__ import annotations

from typing import Any

import torch

from ruyiflow.engine.attention import Segment
from ruyiflow.engine.batch import Work
from ruyiflow.engine.kv_blocks import BlockKV, LatentBlocks
from ruyiflow.kernels import cpu_attention, use_triton

MIN_DEVICE_PAGE = 16  # the Triton kernels' tiles need pages of 16 positions or more


def make_step(works: list[Work], segments: list[Segment]) -> Any:
    pool = getattr(works[0].cache, "pool", None)
    if pool is not None and pool.block_size >= MIN_DEVICE_PAGE and use_triton(pool.pages):
        from ruyiflow.engine.device_kv import DeviceStep

        return DeviceStep.for_works(pool, works, segments)
    if (
        pool is not None
        and pool.device.type == "cpu"
        and not pool.geometry.latent_dim  # MLA: per-item latent views
        and pool.dtype in cpu_attention.DTYPES
        and all(s.num_rows == 1 for s in segments)
        and cpu_attention.is_available()
    ):
        return CpuDecodeStep(pool, works, segments)
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


class SlotSteps:
    """`trunk`, `branch` and `layer` of a step whose layers find their KV in the pool by slot
    (`DeviceStep`, `CpuDecodeStep`): each is `kv(slot, lo, hi)`, the KV of that slot for items
    lo..hi-1."""

    pool: Any
    segments: list[Segment]

    def kv(self, slot: int, lo: int, hi: int) -> Any:
        raise NotImplementedError

    def trunk(self, layer: int, count: int) -> Any:
        return self.kv(layer, 0, count)

    def branch(self, exit_layer: int, lo: int, hi: int) -> Any:
        return self.kv(self.pool.layout.branch_slot(exit_layer), lo, hi)

    def layer(self, index: int) -> Any:
        return self.kv(index, 0, len(self.segments))


class CpuDecodeStep(SlotSteps, ListStep):
    """A CPU step where every item decodes one row: its GQA layers attend through the C kernel
    over the pool's pages, found by the runner's block table (`engine.device_tables`, rows
    rewritten only when a sequence's pages change); boundary states as `ListStep`."""

    def __init__(self, pool: Any, works: list[Work], segments: list[Segment]):
        super().__init__(works, segments)
        self.pool = pool
        tables = pool.device_tables()
        self.rows = torch.tensor(tables.sync(self.caches), dtype=torch.int32)  # [items]
        self.table = tables.table  # [R, S, W] int32, read after the sync (which may grow it)
        self.lengths = torch.tensor([s.start + 1 for s in segments], dtype=torch.int32)

    def kv(self, slot: int, lo: int, hi: int) -> PagedDecodeKV:
        return PagedDecodeKV(self, slot, lo, hi)


class PagedDecodeKV:
    """K/V of one GQA layer slot for items lo..hi-1 of a `CpuDecodeStep`."""

    def __init__(self, step: CpuDecodeStep, slot: int, lo: int, hi: int):
        self.step, self.slot, self.lo, self.hi = step, slot, lo, hi

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segments: list[Segment],
        scale: float,
    ) -> torch.Tensor:
        """q [n, H, D], k/v [n, KVH, D], one row per item -> [n, H, D]; stores k/v first."""
        step, pool = self.step, self.step.pool
        return cpu_attention.cpu_paged_attention(
            q,
            pool.k,
            pool.v,
            step.table[:, self.slot],  # [R, W]
            step.rows[self.lo : self.hi],
            step.lengths[self.lo : self.hi],
            scale,
            k,
            v,
        )
