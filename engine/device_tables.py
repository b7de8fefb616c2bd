"""The runner's block table on the device, for kernels that find pages themselves.

`table [num_rows, num_slots, width] int32` holds, per live sequence (one row each, handed out by
the pool's allocator), the page ids of every slot: `table[row, slot, j]` is the page of that
slot's positions j * slot block size. A layer's kernel reads the `[num_rows, width]` view
`table[:, slot]` (no copy). Rows are written only when a sequence's pages change (every
`block_size` tokens, on a switch or an import): a decode step uploads nothing but its rows,
positions and tokens.

The table grows (rows and width double) when a sequence needs more; a growth replaces the
tensor, so captured CUDA graphs are re-captured (`version` says when).
"""

from __future__ import annotations

import torch

from ruyiflow.engine.paging import BlockAllocator, BlockTable

INITIAL_ROWS = 16
INITIAL_WIDTH = 64


class DeviceTables:
    def __init__(self, allocator: BlockAllocator, device: torch.device):
        self.allocator = allocator
        self.device = device
        self.num_slots = allocator.layout.num_slots
        self.table = torch.zeros(INITIAL_ROWS, self.num_slots, INITIAL_WIDTH, dtype=torch.int32)
        self.table = self.table.to(device)
        self.version = 0  # bumped when `table` is replaced by a larger one
        self._synced: dict[int, tuple[int, int]] = {}  # row -> (id of the table, its version)

    def sync(self, caches: list[BlockTable]) -> list[int]:
        """Make the device rows of `caches` current; returns each cache's row."""
        rows = []
        for cache in caches:
            if cache.row is None:
                cache.row = self.allocator.take_row()
                self._synced.pop(cache.row, None)
            row = cache.row
            if self._synced.get(row) != (id(cache), cache.version):
                self._write(row, cache)
                self._synced[row] = (id(cache), cache.version)
            rows.append(row)
        return rows

    def _write(self, row: int, cache: BlockTable) -> None:
        width = max((len(p) for p in cache.blocks.values()), default=0)
        self.reserve(row + 1, width)
        host = [[0] * self.table.shape[2] for _ in range(self.num_slots)]
        for slot, pages in cache.blocks.items():
            host[slot][: len(pages)] = pages
        self.table[row].copy_(torch.tensor(host, dtype=torch.int32), non_blocking=True)

    def reserve(self, num_rows: int, width: int) -> None:
        """Room for `num_rows` rows of `width` pages per slot (a larger table when short)."""
        rows, _, have = self.table.shape
        if num_rows <= rows and width <= have:
            return
        new_rows, new_width = rows, have
        while new_rows < num_rows:
            new_rows *= 2
        while new_width < width:
            new_width *= 2
        table = torch.zeros(new_rows, self.num_slots, new_width, dtype=torch.int32)
        table = table.to(self.device)
        table[:rows, :, :have] = self.table
        self.table = table
        self.version += 1
