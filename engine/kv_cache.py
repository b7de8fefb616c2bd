"""Per-sequence KV cache with the familial layout.

Trunk layers' KV (`trunk[i]`, i < exit) is shared by every branch whose exit is deeper than i;
each branch layer has its own KV (`branch[e]`; for the last exit that is `layers[N-1]`).
`boundary[e]` keeps the hidden state entering layer e for every cached position, so a running
sequence can move to a deeper exit (run layers e..e'-1 over it) or a shallower one (fill only the
branch layer's KV) without recomputing what is already valid.

Buffers are contiguous per sequence and grow geometrically: attention reads `k[:, :length]`
views, so no sequence ever pays for another's length (no padding across the batch).
"""

from __future__ import annotations

import torch

GROW_MULTIPLE = 64


class SequenceCache:
    def __init__(self, num_kv_heads: int, head_dim: int, hidden_size: int, dtype: torch.dtype):
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
        return torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)

    def reserve(self, length: int) -> None:
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
            nh = torch.empty((new_cap, self.hidden_size), dtype=self.dtype)
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
                (self.capacity, self.hidden_size), dtype=self.dtype
            )
        return self.boundary[exit_layer]

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
