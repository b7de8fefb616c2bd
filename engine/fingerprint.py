"""Model fingerprint: sha256 over the config, every tensor's name and shape, and a fixed sample
of each tensor's values. Identifies the weights independently of the serving dtype (samples are
compared as float32, which every stored dtype converts to exactly or, for GGUF, after the same
dequantisation). A model with an exit overlay (`engine.distill.overlay`) has its own
fingerprint, derived from the base one and the whole overlay."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from ruyiflow.engine.config import ModelConfig

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


def with_overlay(
    base: str, overlay_tensors: Mapping[str, torch.Tensor], overlay_meta: Mapping[str, str]
) -> str:
    """Fingerprint of a base model with an exit overlay applied: the base fingerprint, the
    overlay's metadata and every byte of its tensors (an overlay is a few MB), so nodes with
    different overlays refuse each other's hidden-state handoffs."""
    digest = hashlib.sha256(f"{base};overlay;".encode())
    digest.update(json.dumps(dict(overlay_meta), sort_keys=True).encode())
    for name in sorted(overlay_tensors):
        t = overlay_tensors[name].contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]
