"""Per-sequence KV cache with the familial layout.

Trunk layers' KV (`trunk[i]`, i < exit) is shared by every branch whose exit is deeper than i;
each branch layer has its own KV (`branch[e]`; for the last exit that is `layers[N-1]`).
`boundary[e]` keeps the hidden state entering layer e for every cached position, so a running
sequence can move to a deeper exit (run layers e..e'-1 over it) or a shallower one (fill only the
branch layer's KV) without recomputing what is already valid.

Buffers are contiguous per sequence and grow geometrically: attention reads `k[:, :length]`
views, so no sequence ever pays for another's length (no padding across the batch).

This is the simple cache beside the served paged one (`engine.kv_pool.PagedCache`, same
model-facing accessors: each layer's K/V is one block as long as the capacity). Distillation and
the ONNX export checks read its buffers directly; tests use it as the oracle of the paged cache.
"""

from __future__ import annotations

import torch

from ruyiflow.engine.kv_blocks import BlockKV

GROW_MULTIPLE = 64


class SequenceCache:
    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.device = torch.device(device)
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.length = 0  # positions whose KV is valid in every present entry
        self.capacity = 0
        self.trunk: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # i -> (k, v) [KVH, cap, D]
        self.branch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # exit -> (k, v)
        self.boundary: dict[int, torch.Tensor] = {}  # exit -> [cap, hidden]

    # -- allocation -------------------------------------------------------------------------
    def _new_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.num_kv_heads, self.capacity, self.head_dim)
        return (
            torch.empty(shape, dtype=self.dtype, device=self.device),
            torch.empty(shape, dtype=self.dtype, device=self.device),
        )

    def reserve(self, length: int, exit_layer: int | None = None) -> None:
        """Make room for `length` positions in every present entry (amortised doubling)."""
        if length <= self.capacity:
            return
        new_cap = max(length, 2 * self.capacity)
        new_cap = -(-new_cap // GROW_MULTIPLE) * GROW_MULTIPLE
        old = self.length
        self.capacity = new_cap
        for table in (self.trunk, self.branch):
            for key, (k, v) in table.items():
                nk, nv = self._new_kv()
                nk[:, :old] = k[:, :old]
                nv[:, :old] = v[:, :old]
                table[key] = (nk, nv)
        for key, h in self.boundary.items():
            nh = torch.empty((new_cap, self.hidden_size), dtype=self.dtype, device=self.device)
            nh[:old] = h[:old]
            self.boundary[key] = nh

    def trunk_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.trunk:
            self.trunk[layer] = self._new_kv()
        return self.trunk[layer]

    def branch_kv(self, exit_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if exit_layer not in self.branch:
            self.branch[exit_layer] = self._new_kv()
        return self.branch[exit_layer]

    def boundary_buf(self, exit_layer: int) -> torch.Tensor:
        if exit_layer not in self.boundary:
            self.boundary[exit_layer] = torch.empty(
                (self.capacity, self.hidden_size), dtype=self.dtype, device=self.device
            )
        return self.boundary[exit_layer]

    # -- what the model reads and writes (shared with the paged cache) ------------------------
    def trunk_blocks(self, layer: int) -> BlockKV:
        k, v = self.trunk_kv(layer)
        return BlockKV([k], [v], self.capacity)

    def branch_blocks(self, exit_layer: int) -> BlockKV:
        k, v = self.branch_kv(exit_layer)
        return BlockKV([k], [v], self.capacity)

    def has_boundary(self, exit_layer: int) -> bool:
        return exit_layer in self.boundary

    def write_boundary(self, exit_layer: int, start: int, rows: torch.Tensor) -> None:
        self.boundary_buf(exit_layer)[start : start + rows.shape[0]] = rows

    def read_boundary(self, exit_layer: int, length: int) -> torch.Tensor:
        return self.boundary[exit_layer][:length]

    def branch_exits(self) -> set[int]:
        return set(self.branch)

    def read_trunk(self, num_layers: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [L, KVH, length, D] of trunk layers 0..L-1 (a handoff's payload)."""
        k = torch.stack([self.trunk[i][0][:, :length] for i in range(num_layers)])
        v = torch.stack([self.trunk[i][1][:, :length] for i in range(num_layers)])
        return k, v

    def write_trunk(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [L, KVH, T, D] -> positions 0..T-1 of trunk layers 0..L-1."""
        length = k.shape[2]
        self.reserve(length)
        for i in range(k.shape[0]):
            k_buf, v_buf = self.trunk_kv(i)
            k_buf[:, :length], v_buf[:, :length] = k[i], v[i]

    # -- views ------------------------------------------------------------------------------
    def num_trunk_layers(self) -> int:
        """Trunk layers 0..n-1 present (they are always a prefix)."""
        return len(self.trunk)

    def drop_above(self, exit_layer: int) -> None:
        """Forget entries a sequence at `exit_layer` no longer keeps valid (after moving
        shallower, deeper trunk layers would go stale as new tokens arrive)."""
        for i in [i for i in self.trunk if i >= exit_layer]:
            del self.trunk[i]
        for e in [e for e in self.branch if e != exit_layer]:
            del self.branch[e]
        for e in [e for e in self.boundary if e > exit_layer]:
            del self.boundary[e]

    def num_bytes(self) -> int:
        per_kv = 2 * self.num_kv_heads * self.capacity * self.head_dim
        n = per_kv * (len(self.trunk) + len(self.branch))
        n += self.capacity * self.hidden_size * len(self.boundary)
        return n * torch.tensor([], dtype=self.dtype).element_size()
