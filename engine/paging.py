"""Paged KV cache accounting, pure Python: which pages of the pool each sequence holds.

The pool (`engine.kv_pool.KVPool`, owned by the model runner) is `num_blocks` pages of equal
size. A page holds `block_size` positions of one layer's K/V (or of one MLA layer's latent), or
`boundary_block_size` positions of the hidden states at one exit's boundary. A sequence's
`BlockTable` lists its pages per *slot*:

    trunk slot i          (i < num_trunk)        layer i's K/V, shared by every branch deeper than i
    branch slot of exit e (familial models)      the branch layer's K/V
    boundary slot of e    (familial models)      the hidden state entering layer e

A sequence at exit e holds trunk slots 0..e-1, the branch slot of e and the boundary slots of
every exit <= e (a switch to a shallower exit starts from those); an MoE model's sequence holds
one slot per layer. Page 0 is never handed out: device kernels point padding rows at it.

Nothing here touches a tensor: the scheduler admits, grows and preempts with these numbers,
and the runner reads the page ids.
"""

from __future__ import annotations

from dataclasses import dataclass


class OutOfBlocks(Exception):
    """Not enough free pages right now (the scheduler preempts or waits)."""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class PageLayout:
    block_size: int  # positions per K/V (or latent) page
    num_trunk: int  # trunk slots 0..num_trunk-1
    exits: tuple[int, ...] = ()  # familial: one branch and one boundary slot per exit
    boundary_block_size: int = 0  # positions per hidden-state page (familial only)

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_trunk < 0:
            raise ValueError("block_size must be >= 1 and num_trunk >= 0")
        if self.exits and self.boundary_block_size < 1:
            raise ValueError("a familial layout needs boundary_block_size >= 1")

    @property
    def num_slots(self) -> int:
        return self.num_trunk + 2 * len(self.exits)

    def branch_slot(self, exit_layer: int) -> int:
        return self.num_trunk + self.exits.index(exit_layer)

    def boundary_slot(self, exit_layer: int) -> int:
        return self.num_trunk + len(self.exits) + self.exits.index(exit_layer)

    def is_boundary(self, slot: int) -> bool:
        return slot >= self.num_trunk + len(self.exits)

    def slot_block_size(self, slot: int) -> int:
        return self.boundary_block_size if self.is_boundary(slot) else self.block_size

    def slots_for(self, exit_layer: int) -> tuple[int, ...]:
        """Every slot a sequence at `exit_layer` keeps valid."""
        if not self.exits:
            return tuple(range(self.num_trunk))
        boundaries = tuple(self.boundary_slot(e) for e in self.exits if e <= exit_layer)
        return (*range(exit_layer), self.branch_slot(exit_layer), *boundaries)

    def blocks_for(self, exit_layer: int, length: int) -> int:
        """Pages one sequence of `length` positions at `exit_layer` holds."""
        return sum(cdiv(length, self.slot_block_size(s)) for s in self.slots_for(exit_layer))


class BlockAllocator:
    """The free pages of one pool (ids 1..num_blocks-1) and the rows of the runner's device
    block table (one per live sequence that ran on the device path)."""

    def __init__(self, layout: PageLayout, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a pool needs 2 pages or more (page 0 is reserved), got {num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks - 1  # allocatable
        self._free = list(range(num_blocks - 1, 0, -1))  # a stack: recently freed pages first
        self._free_rows: list[int] = []
        self.num_rows = 0  # device table rows ever handed out

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"{count} pages asked, {len(self._free)} free")
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    def take_row(self) -> int:
        if self._free_rows:
            return self._free_rows.pop()
        self.num_rows += 1
        return self.num_rows - 1

    def free_row(self, row: int) -> None:
        self._free_rows.append(row)


class BlockTable:
    """One sequence's pages, by slot. `length` counts positions valid in every held slot."""

    def __init__(self, allocator: BlockAllocator):
        self.allocator = allocator
        self.layout = allocator.layout
        self.length = 0
        self.blocks: dict[int, list[int]] = {}  # slot -> page ids, position // slot block size
        self.stale: set[int] = set()  # boundary slots missing positions (after a hidden import)
        self.version = 0  # bumped on every change of `blocks` (the runner re-syncs its copy)
        self.row: int | None = None  # row of the runner's device block table, when it has one
        self._covered = (-1, 0)  # (exit, positions every slot of that exit holds pages for)

    def num_needed(self, exit_layer: int, length: int) -> int:
        """Pages to add so every slot of `exit_layer` covers `length` positions."""
        if exit_layer == self._covered[0] and length <= self._covered[1]:
            return 0  # the common decode step: still inside the last pages (no slot walk)
        layout, held = self.layout, self.blocks
        return sum(
            max(0, cdiv(length, layout.slot_block_size(s)) - len(held.get(s, ())))
            for s in layout.slots_for(exit_layer)
        )

    def ensure(self, exit_layer: int, length: int) -> None:
        """Grow every slot of `exit_layer` to `length` positions; raises OutOfBlocks (and takes
        nothing) when the pool has too few free pages."""
        if exit_layer == self._covered[0] and length <= self._covered[1]:
            return  # the common decode step: still inside the last pages
        slots = self.layout.slots_for(exit_layer)
        self.ensure_slots(slots, length)
        covered = min(len(self.blocks[s]) * self.layout.slot_block_size(s) for s in slots)
        self._covered = (exit_layer, covered)

    def ensure_slots(self, slots: tuple[int, ...] | list[int], length: int) -> None:
        """Grow the given slots to `length` positions (OutOfBlocks, nothing taken, when short)."""
        layout = self.layout
        missing = {
            s: cdiv(length, layout.slot_block_size(s)) - len(self.blocks.get(s, ())) for s in slots
        }
        need = sum(n for n in missing.values() if n > 0)
        if not need:
            return
        pages = self.allocator.allocate(need)
        for s, num in missing.items():
            if num > 0:
                self.blocks.setdefault(s, []).extend(pages[len(pages) - num :])
                del pages[len(pages) - num :]
        self.version += 1

    def keep_only(self, exit_layer: int) -> None:
        """Free every slot a sequence at `exit_layer` no longer keeps valid."""
        keep = set(self.layout.slots_for(exit_layer))
        for s in [s for s in self.blocks if s not in keep]:
            self.allocator.free(self.blocks.pop(s))
            self.stale.discard(s)
        self.version += 1
        self._covered = (-1, 0)

    def release(self) -> None:
        """Give every page (and the device row) back; the table is empty afterwards."""
        for pages in self.blocks.values():
            self.allocator.free(pages)
        self.blocks.clear()
        self.stale.clear()
        self.length = 0
        self.version += 1
        self._covered = (-1, 0)
        if self.row is not None:
            self.allocator.free_row(self.row)
            self.row = None

    def num_blocks(self) -> int:
        return sum(len(p) for p in self.blocks.values())

    def has_slot(self, slot: int) -> bool:
        return slot in self.blocks and slot not in self.stale
