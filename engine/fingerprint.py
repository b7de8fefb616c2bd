"""Model fingerprint: sha256 over the config, every tensor's name and shape, and a fixed sample
of each tensor's values. Identifies the weights independently of the serving dtype (samples are
compared as float32, which every stored dtype converts to exactly or, for GGUF, after the same
dequantisation)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from engine.config import ModelConfig

SAMPLES_PER_TENSOR = 16
FINGERPRINT_CHARS = 24


def fingerprint(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    cfg = config.to_dict()
    cfg.pop("default_exit")  # a serving choice, not part of the weights
    digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        flat = t.reshape(-1)
        if flat.numel():
            idx = torch.arange(SAMPLES_PER_TENSOR) * (flat.numel() - 1) // (SAMPLES_PER_TENSOR - 1)
            digest.update(flat[idx].float().numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]
