"""Helpers for the ONNX tests: the same tokens through the torch model and an OnnxBranch."""

from __future__ import annotations

import numpy as np
import torch

from ruyiflow.engine.model import Work


def chunks(ids: list[int], split: int | list[int]) -> list[list[int]]:
    """`split` an int: prefill ids[:split], then one token per step; a list: chunk sizes."""
    sizes = [split] + [1] * (len(ids) - split) if isinstance(split, int) else split
    assert sum(sizes) == len(ids)
    starts = np.cumsum([0, *sizes])
    return [ids[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def torch_run(loaded, ids: list[int], exit_layer: int, split: int | list[int]):
    """Logits [num_chunks, V] of each chunk's last token, and the SequenceCache."""
    model = loaded.model
    cache = model.new_cache()
    out, start = [], 0
    for chunk in chunks(ids, split):
        out.append(model.forward([Work(cache, chunk, start, exit_layer)])[0])
        start += len(chunk)
    return torch.stack(out).numpy(), cache


def ort_run(branch, ids: list[int], split: int | list[int]):
    """Same schedule through the ONNX branch; (logits [num_chunks, V], boundaries [T, hidden],
    present)."""
    past = branch.empty_past(1)
    logits, boundaries, start = [], [], 0
    for chunk in chunks(ids, split):
        n = len(chunk)
        lg, boundary, past = branch.run(
            np.array([chunk]),
            np.arange(start, start + n)[None],
            np.ones((1, start + n), np.int64),
            past,
        )
        logits.append(lg[0])
        boundaries.append(boundary[0])
        start += n
    return np.stack(logits), np.concatenate(boundaries), past


def assert_cache_equal(cache, present, boundary, exit_layer: int, atol: float = 1e-4) -> None:
    """ORT present KV and boundary states equal the torch SequenceCache contents."""
    t = cache.length
    assert present[0][0].shape[2] == t
    for i, (k, v) in enumerate(present):
        ref_k, ref_v = cache.trunk[i] if i < exit_layer else cache.branch[exit_layer]
        np.testing.assert_allclose(k[0], ref_k[:, :t].numpy(), atol=atol, rtol=1e-4)
        np.testing.assert_allclose(v[0], ref_v[:, :t].numpy(), atol=atol, rtol=1e-4)
    np.testing.assert_allclose(
        boundary, cache.boundary[exit_layer][:t].numpy(), atol=atol, rtol=1e-4
    )
