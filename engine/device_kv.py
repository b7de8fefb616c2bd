"""The device path of attention over the paged pool: stores by index, decode through the Triton
paged-attention kernels (one launch per layer for every decode row of a step), prefill through
SDPA. Taken when the pool's tensors go to Triton (`kernels.use_triton`: CUDA, or the CPU
interpreter when forced, which is how the CPU tests run this very path).

`DeviceStep` is built once per forward call from its (exit-sorted) work items: each item's row of
the device block table (`engine.device_tables`), and per packed row its sequence's row and
position. A layer asks it for `DeviceKV` (GQA) or `DeviceLatentKV` (MLA) over a range of items:
the trunk layers' prefix of items, or the items leaving at one exit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ruyiflow.engine.attention import causal_mask
from ruyiflow.engine.kv_step import SlotSteps
from ruyiflow.kernels.paged_attention import paged_attention
from ruyiflow.kernels.paged_mla import paged_mla

if TYPE_CHECKING:
    from ruyiflow.engine.attention import Segment
    from ruyiflow.engine.batch import Work
    from ruyiflow.engine.kv_pool import KVPool


class DeviceStep(SlotSteps):
    def __init__(
        self,
        pool: KVPool,
        segments: list[Segment],
        token_rows: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        lengths: torch.Tensor,
        item_rows: list[int] | None = None,
    ):
        """token_rows / positions [N] int64: each packed row's table row and position; rows
        [items] int32/int64 and lengths [items] int32: each item's table row and length after
        this step; item_rows: the same rows on the host (prefill gathers need them)."""
        self.pool, self.segments, self.layout = pool, segments, pool.layout
        self.table = pool.device_tables().table  # [R, S, W] int32
        self.token_rows, self.positions = token_rows, positions
        self.rows, self.lengths, self.item_rows = rows, lengths, item_rows

    @classmethod
    def for_works(cls, pool: KVPool, works: list[Work], segments: list[Segment]) -> DeviceStep:
        """A step's metadata from its work items: rows synced, four small uploads."""
        rows = pool.device_tables().sync([w.cache for w in works])
        device = pool.device
        positions = [s.start + t for s in segments for t in range(s.num_rows)]
        row_of_token = [rows[k] for k, s in enumerate(segments) for _ in range(s.num_rows)]
        ends = [s.start + s.num_rows for s in segments]
        return cls(
            pool,
            segments,
            torch.tensor(row_of_token, device=device),
            torch.tensor(positions, device=device),
            torch.tensor(rows, dtype=torch.int32, device=device),
            torch.tensor(ends, dtype=torch.int32, device=device),
            rows,
        )

    # -- what a layer asks for (the interface of `kv_step.ListStep`) ---------------------------
    def kv(self, slot: int, lo: int, hi: int) -> DeviceKV:  # trunk, branch, layer: SlotSteps
        return DeviceKV(self, slot, lo, hi)

    def latent(self, index: int) -> DeviceLatentKV:
        return DeviceLatentKV(self, index, 0, len(self.segments))

    def row_range(self, lo: int, hi: int) -> slice:
        first, last = self.segments[lo], self.segments[hi - 1]
        return slice(first.row, last.row + last.num_rows)

    def pages_of(self, slot: int, rows: slice, block_size: int) -> tuple[torch.Tensor, ...]:
        """(page, offset) [n] of packed rows `rows` in one slot."""
        pos = self.positions[rows]
        return self.table[self.token_rows[rows], slot, pos // block_size], pos % block_size

    def write_boundary(self, exit_layer: int, count: int, h: torch.Tensor) -> None:
        """h [rows of items 0..count-1, hidden] -> their boundary states at `exit_layer`."""
        rows = self.row_range(0, count)
        slot = self.layout.boundary_slot(exit_layer)
        page, offset = self.pages_of(slot, rows, self.layout.boundary_block_size)
        self.pool.hidden[page, offset] = h[rows]

    def gather(self, pages: torch.Tensor, slot: int, item: int, length: int) -> torch.Tensor:
        """Positions 0..length-1 of one item's pages [NP, ..., PAGE, ...] (position axis -2)
        concatenated along that axis."""
        block = self.layout.block_size
        ids = self.table[self.item_rows[item], slot, : -(-length // block)].long()
        parts = pages[ids]  # [n, ..., PAGE, ...]
        return torch.cat(list(parts.unbind(0)), dim=-2).narrow(-2, 0, length)


class DeviceKV:
    """K/V of one GQA layer slot for items lo..hi-1 of a step."""

    def __init__(self, step: DeviceStep, slot: int, lo: int, hi: int):
        self.step, self.slot, self.lo, self.hi = step, slot, lo, hi

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        segments: list[Segment],
        scale: float,
    ) -> torch.Tensor:
        """q [n, H, D], k/v [n, KVH, D] of this layer call's rows -> [n, H, D]; stores k/v."""
        step, pool = self.step, self.step.pool
        page, offset = step.pages_of(self.slot, step.row_range(self.lo, self.hi), pool.block_size)
        pool.k[page, :, offset] = k
        pool.v[page, :, offset] = v
        table = step.table[:, self.slot]  # [R, W] view
        if len(segments) == q.shape[0]:  # every item decodes one row: one launch
            rows, lengths = step.rows[self.lo : self.hi], step.lengths[self.lo : self.hi]
            return paged_attention(q, pool.k, pool.v, table, rows, lengths, scale)
        out = torch.empty_like(q)
        decode = [i for i, s in enumerate(segments) if s.num_rows == 1]
        if decode:
            items = torch.tensor([self.lo + i for i in decode], device=q.device)
            q_rows = torch.tensor([segments[i].row for i in decode], device=q.device)
            out[q_rows] = paged_attention(
                q[q_rows], pool.k, pool.v, table, step.rows[items], step.lengths[items], scale
            )
        for i, seg in enumerate(segments):
            if seg.num_rows > 1:
                rows = slice(seg.row, seg.row + seg.num_rows)
                out[rows] = self._prefill(q[rows], k[rows], v[rows], seg, self.lo + i, scale)
        return out

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        seg: Segment,
        item: int,
        scale: float,
    ) -> torch.Tensor:
        """SDPA of one prefill chunk: over its own rows when it starts the sequence, else over
        the prefix gathered from the pages (the chunk's rows already stored there)."""
        q4 = q.transpose(0, 1)[None]  # [1, H, T, D]
        if seg.start == 0:
            k4, v4 = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(
                q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            end = seg.start + seg.num_rows
            k4 = self.step.gather(self.step.pool.k, self.slot, item, end)[None]  # [1, KVH, L, D]
            v4 = self.step.gather(self.step.pool.v, self.slot, item, end)[None]
            mask = causal_mask(seg.num_rows, seg.start).to(q.device)
            o = F.scaled_dot_product_attention(
                q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=True
            )
        return o[0].transpose(0, 1)


class DeviceLatentKV:
    """The latent cache of one MLA layer slot for items lo..hi-1 of a step."""

    def __init__(self, step: DeviceStep, slot: int, lo: int, hi: int):
        self.step, self.slot, self.lo, self.hi = step, slot, lo, hi

    def store(self, new: torch.Tensor) -> None:
        """new [n, R + P] latents of this layer call's rows -> their pages."""
        step = self.step
        rows = step.row_range(self.lo, self.hi)
        page, offset = step.pages_of(self.slot, rows, step.pool.block_size)
        step.pool.latent[page, offset] = new

    def prefix(self, item: int, end: int) -> torch.Tensor:
        """[end, R + P] latents of item `item` (relative to lo)."""
        return self.step.gather(self.step.pool.latent, self.slot, self.lo + item, end)

    def decode(
        self, q_lat: torch.Tensor, items: list[int], rank: int, scale: float
    ) -> torch.Tensor:
        """q_lat [Nd, H, R + P] of decode items (relative to lo) -> weighted latents [Nd, H, R]."""
        step = self.step
        if len(items) == self.hi - self.lo:  # all decode: slices (no index tensor to upload)
            index: slice | torch.Tensor = slice(self.lo, self.hi)
        else:
            index = torch.tensor([self.lo + i for i in items], device=q_lat.device)
        table = step.table[:, self.slot]
        rows, lengths = step.rows[index], step.lengths[index]
        return paged_mla(q_lat.contiguous(), step.pool.latent, table, rows, lengths, scale, rank)
