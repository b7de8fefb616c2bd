"""The paged KV pool on the model runner's device, and the per-sequence cache over it.

`KVPool` preallocates `num_blocks` equal pages from a memory budget (a fraction of the device's
free memory on CUDA, a byte budget on CPU) and views them by kind:

    K/V page       [2, KVH, block_size, D]            one layer's K then V (GQA)
    latent page    [block_size, kv_lora_rank + rope]  one MLA layer (DeepSeek-V3)
    boundary page  [boundary_block_size, hidden]      hidden states at one exit: as many
                                                      positions as fit in a page

`PagedCache` is a `paging.BlockTable` (what the scheduler counts) that also hands the model views
of its pages. On CPU a sequence shorter than `block_size` (default 256) sits in one page per
layer, so its decode attention reads a plain view, as with a contiguous cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ruyiflow.engine.device_tables import DeviceTables
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.kv_blocks import BlockKV, LatentBlocks, read_positions, write_positions
from ruyiflow.engine.paging import BlockAllocator, BlockTable, PageLayout, cdiv

CPU_BLOCK_SIZE = 256  # few blocks per sequence: decode attention over views, no gathers
CUDA_BLOCK_SIZE = 64
CPU_KV_BYTES = 1 << 30
KV_MEMORY_FRACTION = 0.85


@dataclass(frozen=True)
class CacheConfig:
    """How big the pool is and how it is cut. `None` picks the device's default. `paged=False`
    serves from contiguous per-sequence caches instead (the simple path: no pool, no page
    accounting; a finished sequence's cache keeps its contents for whoever holds it)."""

    block_size: int | None = None  # positions per K/V page: CPU 256, CUDA 64 (a power of 2)
    kv_cache_bytes: int | None = None  # the budget; default CPU 1 GiB, CUDA a fraction of free
    kv_memory_fraction: float = KV_MEMORY_FRACTION  # CUDA: of free memory after the weights
    paged: bool = True

    def __post_init__(self) -> None:
        if self.block_size is not None and (
            self.block_size < 1 or self.block_size & (self.block_size - 1)
        ):
            raise ValueError(f"block_size must be a power of 2, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be > 0")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError("kv_memory_fraction must be in (0, 1]")


@dataclass(frozen=True)
class PageGeometry:
    """What one page of a model holds: GQA K/V (`num_kv_heads`, `head_dim`) or an MLA latent
    (`latent_dim`), plus boundary states of width `hidden_size` for familial models."""

    block_size: int
    num_kv_heads: int = 0
    head_dim: int = 0
    latent_dim: int = 0
    hidden_size: int = 0  # 0: no boundary pages

    @property
    def page_elems(self) -> int:
        if self.latent_dim:
            return self.block_size * self.latent_dim
        return 2 * self.num_kv_heads * self.block_size * self.head_dim

    @property
    def boundary_block_size(self) -> int:
        return self.page_elems // self.hidden_size if self.hidden_size else 0

    def elems_per_token(self, layout: PageLayout, exit_layer: int) -> int:
        """Cache values one position costs a sequence at `exit_layer` (K/V or latent of every
        layer it runs, and its boundary states)."""
        kv = self.latent_dim or 2 * self.num_kv_heads * self.head_dim
        slots = layout.slots_for(exit_layer)
        return sum(self.hidden_size if layout.is_boundary(s) else kv for s in slots)


def pool_budget(config: CacheConfig, device: torch.device) -> int:
    """Bytes the pool may take: the configured budget, else the device's default."""
    if config.kv_cache_bytes is not None:
        return config.kv_cache_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * config.kv_memory_fraction)
    return CPU_KV_BYTES


class KVPool:
    """`num_blocks` pages of `geometry` in `dtype` on `device`, with their views by kind."""

    def __init__(
        self,
        geometry: PageGeometry,
        layout: PageLayout,
        num_blocks: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        g = geometry
        self.geometry, self.layout, self.dtype, self.device = g, layout, dtype, device
        self.num_blocks = num_blocks
        self.pages = torch.empty(num_blocks, g.page_elems, dtype=dtype, device=device)
        self.allocator = BlockAllocator(layout, num_blocks)
        self._tables: DeviceTables | None = None
        # per-page views, built once on CPU: a decode step takes them by index, no tensor op
        self._views: dict[str, list[torch.Tensor]] = {}
        if g.latent_dim:
            self.latent = self.pages.view(num_blocks, g.block_size, g.latent_dim)
            kinds = ("latent",)
        else:
            kv = self.pages.view(num_blocks, 2, g.num_kv_heads, g.block_size, g.head_dim)
            self.k, self.v = kv[:, 0], kv[:, 1]  # [NB, KVH, block_size, D], strided
            kinds = ("k", "v")
        if device.type == "cpu":
            self._views = {kind: list(getattr(self, kind).unbind(0)) for kind in kinds}
        if g.hidden_size:
            per_page = g.boundary_block_size
            self.hidden = self.pages[:, : per_page * g.hidden_size].view(
                num_blocks, per_page, g.hidden_size
            )

    @classmethod
    def for_budget(
        cls,
        geometry: PageGeometry,
        layout: PageLayout,
        budget_bytes: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVPool:
        page_bytes = geometry.page_elems * torch.empty((), dtype=dtype).element_size()
        num_blocks = budget_bytes // page_bytes
        if num_blocks < 2:
            raise ValueError(
                f"a KV budget of {budget_bytes} bytes holds {num_blocks} page(s) of {page_bytes} "
                "bytes; give the cache more memory"
            )
        return cls(geometry, layout, num_blocks, dtype, device)

    @property
    def page_bytes(self) -> int:
        return self.pages.shape[1] * self.pages.element_size()

    @property
    def block_size(self) -> int:
        return self.geometry.block_size

    def device_tables(self) -> DeviceTables:
        """The block table on the device, for kernels that find pages themselves (made on the
        first device-path step)."""
        if self._tables is None:
            self._tables = DeviceTables(self.allocator, self.device)
        return self._tables

    def new_cache(self) -> PagedCache:
        return PagedCache(self)

    def gather_kv(self, blocks: list[list[int]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [L, KVH, length, D] of positions 0..length-1 of L layers given by their page
        lists: one gather per tensor, whatever the number of pages."""
        bs = self.geometry.block_size
        num = cdiv(length, bs)
        ids = torch.tensor([b[:num] for b in blocks], device=self.device)  # [L, num]

        def gather(pages: torch.Tensor) -> torch.Tensor:  # pages [NB, KVH, bs, D]
            x = pages[ids].permute(0, 2, 1, 3, 4)  # [L, KVH, num, bs, D]
            return x.reshape(*x.shape[:2], num * bs, x.shape[-1])[:, :, :length]

        return gather(self.k), gather(self.v)

    def scatter_kv(self, blocks: list[list[int]], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [L, KVH, T, D] at positions 0..T-1 of L layers' pages."""
        bs = self.geometry.block_size
        num_layers, heads, length, dim = k.shape
        num = cdiv(length, bs)
        ids = torch.tensor([b[:num] for b in blocks], device=self.device)  # [L, num]
        for pages, src in ((self.k, k), (self.v, v)):
            if num * bs != length:
                src = torch.nn.functional.pad(src, (0, 0, 0, num * bs - length))
            pages[ids] = src.view(num_layers, heads, num, bs, dim).permute(0, 2, 1, 3, 4)

    def page_views(self, kind: str, ids: list[int]) -> list[torch.Tensor]:
        """Views of pages `ids` of one kind (`k`, `v`, `latent`, `hidden`)."""
        views = self._views.get(kind)
        if views is not None:
            return [views[b] for b in ids]
        table = getattr(self, kind)
        return [table[b] for b in ids]


class PagedCache(BlockTable):
    """One sequence's pages (accounting in `BlockTable`) and views of them for the model."""

    def __init__(self, pool: KVPool):
        super().__init__(pool.allocator)
        self.pool = pool
        self._kv_views: dict[int, BlockKV] = {}  # slot -> views, valid for `_views_version`
        self._views_version = -1

    def reserve(self, length: int, exit_layer: int) -> None:
        self.ensure(exit_layer, length)

    # -- familial dense models ----------------------------------------------------------------
    def trunk_blocks(self, layer: int) -> BlockKV:
        return self._kv(layer)

    def branch_blocks(self, exit_layer: int) -> BlockKV:
        return self._kv(self.layout.branch_slot(exit_layer))

    def num_trunk_layers(self) -> int:
        return sum(1 for s in self.blocks if s < self.layout.num_trunk)

    def branch_exits(self) -> set[int]:
        return {e for e in self.layout.exits if self.layout.branch_slot(e) in self.blocks}

    def has_boundary(self, exit_layer: int) -> bool:
        return self.has_slot(self.layout.boundary_slot(exit_layer))

    def write_boundary(self, exit_layer: int, start: int, rows: torch.Tensor) -> None:
        """rows [n, hidden] -> the boundary states of positions start..start+n-1."""
        slot = self.layout.boundary_slot(exit_layer)
        pages = self.pool.page_views("hidden", self.blocks[slot])
        write_positions(pages, self.layout.boundary_block_size, start, rows, axis=0)

    def read_boundary(self, exit_layer: int, length: int) -> torch.Tensor:
        """[length, hidden] boundary states of positions 0..length-1."""
        if not self.layout.exits:
            raise InvalidRequest(
                "an MoE model keeps no boundary hidden states; hand its sequences off in "
                "tokens mode"
            )
        slot = self.layout.boundary_slot(exit_layer)
        pages = self.pool.page_views("hidden", self.blocks[slot])
        return read_positions(pages, self.layout.boundary_block_size, length, axis=0)

    def drop_above(self, exit_layer: int) -> None:
        self.keep_only(exit_layer)

    def read_trunk(self, num_layers: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [L, KVH, length, D] of trunk layers 0..L-1: one gather each."""
        return self.pool.gather_kv([self.blocks[i] for i in range(num_layers)], length)

    def write_trunk(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [L, KVH, T, D] -> positions 0..T-1 of trunk layers 0..L-1 (pages held)."""
        self.pool.scatter_kv([self.blocks[i] for i in range(k.shape[0])], k, v)

    # -- MoE models (one slot per layer) ------------------------------------------------------
    def layer_blocks(self, layer: int) -> BlockKV:
        return self._kv(layer)

    def latent_blocks(self, layer: int) -> LatentBlocks:
        """[block_size, latent_dim] pages of MLA layer `layer`."""
        pages = self.pool.page_views("latent", self.blocks[layer])
        return LatentBlocks(pages, self.layout.block_size)

    def _kv(self, slot: int) -> BlockKV:
        if self._views_version != self.version:
            self._kv_views.clear()
            self._views_version = self.version
        kv = self._kv_views.get(slot)
        if kv is None:
            ids, pool = self.blocks[slot], self.pool
            k, v = pool.page_views("k", ids), pool.page_views("v", ids)
            kv = BlockKV(k, v, pool.geometry.block_size)
            self._kv_views[slot] = kv
        return kv
