"""Per-sequence KV cache of an MoE model: one entry per layer, contiguous per sequence, grown
geometrically like `engine.kv_cache.SequenceCache`.

GQA layers (Hunyuan, dots1) keep `(K, V)`, each [KVH, cap, D] (the layout
`engine.layers.attention` writes). MLA layers (DeepSeek-V3) keep one [cap, kv_lora_rank +
qk_rope_head_dim] tensor: the normalised compressed latent and the rotated shared rope key, not the
per-head K/V they expand to. An MoE model has no exits to move between, so there are no boundary
states: a handoff of an MoE sequence is `tokens` mode only.

The simple cache beside the served paged one (`engine.kv_pool.PagedCache`): both give the model
`layer_blocks` (GQA) / `latent_blocks` (MLA), here one block as long as the capacity.
"""

from __future__ import annotations

import math

import torch

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.kv_blocks import BlockKV, LatentBlocks

GROW_MULTIPLE = 64


class MoECache:
    def __init__(
        self,
        num_layers: int,
        shapes: tuple[tuple[int, ...], ...],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        """`shapes`: the tensors of one layer's entry, with -1 marking the position axis."""
        if any(s.count(-1) != 1 for s in shapes):
            raise ValueError(f"each cache tensor shape needs one -1 (position) axis: {shapes}")
        self.num_layers = num_layers
        self.shapes = shapes
        self.dtype = dtype
        self.device = torch.device(device)
        self.length = 0  # positions whose entries are valid in every layer
        self.capacity = 0
        self.layers: list[tuple[torch.Tensor, ...]] = []

    @classmethod
    def for_gqa(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> MoECache:
        shape = (num_kv_heads, -1, head_dim)
        return cls(num_layers, (shape, shape), dtype, device)

    @classmethod
    def for_mla(
        cls,
        num_layers: int,
        latent_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> MoECache:
        return cls(num_layers, ((-1, latent_dim),), dtype, device)

    def _alloc(self, capacity: int) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.empty(
                tuple(capacity if d == -1 else d for d in s), dtype=self.dtype, device=self.device
            )
            for s in self.shapes
        )

    def reserve(self, length: int, exit_layer: int | None = None) -> None:
        """Room for `length` positions in every layer (amortised doubling; valid data kept)."""
        if length <= self.capacity:
            return
        capacity = -(-max(length, 2 * self.capacity) // GROW_MULTIPLE) * GROW_MULTIPLE
        old = self.length
        grown = []
        for entry in self.layers:
            new = self._alloc(capacity)
            for src, dst, shape in zip(entry, new, self.shapes, strict=True):
                dst.narrow(shape.index(-1), 0, old).copy_(src.narrow(shape.index(-1), 0, old))
            grown.append(new)
        self.layers = grown or [self._alloc(capacity) for _ in range(self.num_layers)]
        self.capacity = capacity

    def layer(self, index: int) -> tuple[torch.Tensor, ...]:
        return self.layers[index]

    def layer_blocks(self, index: int) -> BlockKV:
        k, v = self.layers[index]
        return BlockKV([k], [v], self.capacity)

    def latent_blocks(self, index: int) -> LatentBlocks:
        return LatentBlocks([self.layers[index][0]], self.capacity)

    # -- facts ------------------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        """Bytes one cached position costs over all layers."""
        per_layer = sum(-math.prod(s) for s in self.shapes)  # the -1 axis flips the sign
        return self.num_layers * per_layer * torch.tensor([], dtype=self.dtype).element_size()

    def num_bytes(self) -> int:
        return self.capacity * self.bytes_per_token()

    @property
    def boundary(self) -> dict:
        raise InvalidRequest(
            "an MoE model keeps no boundary hidden states; hand its sequences off in tokens mode"
        )

    def drop_above(self, exit_layer: int) -> None:
        """Nothing to drop: every layer belongs to the single exit."""
