"""A reference "branch" with OnnxBranch's call signature, computed row by row with the torch
FamilyModel: it lets the ONNX Runtime engine's scheduling, padding, masking and handoff layout be
tested against the torch engine independently of any ONNX graph."""

from __future__ import annotations

import numpy as np
import torch

from ruyiflow.engine.checkpoint import LoadedModel
from ruyiflow.engine.model import Work


class TorchBranch:
    def __init__(self, loaded: LoadedModel, exit_layer: int) -> None:
        c = loaded.config
        self.model, self.exit = loaded.model, exit_layer
        self.fingerprint, self.family, self.exits = loaded.fingerprint, c.family, c.exits
        self.hidden_size, self.num_kv_layers = c.hidden_size, exit_layer + 1
        self.num_kv_heads, self.head_dim, self.vocab_size = c.num_kv_heads, c.head_dim, c.vocab_size
        self.max_context, self.eos_token_ids = c.max_position_embeddings, c.eos_token_ids
        self.calls: list[tuple[int, int]] = []  # (batch, new tokens) per call

    def run(self, ids, positions, mask, past):
        """ids/positions [B,S], mask [B,P+S] (1 = attend), past exit+1 (k, v) [B,KVH,P,D]
        -> logits [B,V] (last position), boundary [B,S,H], present (k, v) [B,KVH,P+S,D]."""
        b, s = ids.shape
        past = [a for kv in past for a in kv]  # flat: k0, v0, k1, v1, ...
        p = past[0].shape[2]
        self.calls.append((b, s))
        present = [np.zeros((b, self.num_kv_heads, p + s, self.head_dim), np.float32) for _ in past]
        logits, boundary = [], np.zeros((b, s, self.hidden_size), np.float32)
        for row in range(b):
            valid = np.flatnonzero(mask[row, :p])
            t = len(valid)
            assert np.array_equal(valid, np.arange(t)), "rows are right-padded"
            assert list(positions[row]) == list(range(t, t + s))
            cache = self.model.new_cache()
            cache.reserve(t + s)
            for i in range(self.exit + 1):
                k, v = cache.trunk_kv(i) if i < self.exit else cache.branch_kv(self.exit)
                k[:, :t] = torch.from_numpy(past[2 * i][row, :, :t])
                v[:, :t] = torch.from_numpy(past[2 * i + 1][row, :, :t])
            cache.boundary_buf(self.exit)
            cache.length = t
            (out,) = self.model.forward([Work(cache, [int(x) for x in ids[row]], t, self.exit)])
            logits.append(out.numpy())
            boundary[row] = cache.boundary[self.exit][t : t + s].numpy()
            for i in range(self.exit + 1):
                k, v = cache.trunk[i] if i < self.exit else cache.branch[self.exit]
                present[2 * i][row, :, :t] = past[2 * i][row, :, :t]
                present[2 * i + 1][row, :, :t] = past[2 * i + 1][row, :, :t]
                present[2 * i][row, :, p : p + s] = k[:, t : t + s].numpy()
                present[2 * i + 1][row, :, p : p + s] = v[:, t : t + s].numpy()
        pairs = [(present[2 * i], present[2 * i + 1]) for i in range(len(present) // 2)]
        return np.stack(logits), boundary, pairs

    def empty_past(self, batch):
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32))] * self.num_kv_layers
