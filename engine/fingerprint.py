"""Model fingerprint: sha256 over the config, every tensor's name and shape, and a fixed sample
of each tensor's values. Identifies the weights independently of the serving dtype (samples are
compared as float32, which every stored dtype converts to exactly or, for GGUF, after the same
dequantisation). A model with an exit overlay (`engine.distill.overlay`) has its own
fingerprint, derived from the base one and the whole overlay.

Loaders read checkpoints lazily through `SampledTensors`, which keeps each tensor's sample as the
model builder reads it, so fingerprinting never reads the checkpoint a second time."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping

import torch

from ruyiflow.engine.config import ModelConfig

SAMPLES_PER_TENSOR = 16
FINGERPRINT_CHARS = 24


def tensor_sample(t: torch.Tensor) -> tuple[tuple[int, ...], bytes]:
    """(shape, float32 bytes of SAMPLES_PER_TENSOR evenly spaced values) of a tensor."""
    flat = t.reshape(-1)
    if not flat.numel():
        return tuple(t.shape), b""
    idx = torch.arange(SAMPLES_PER_TENSOR, device=t.device)
    idx = idx * (flat.numel() - 1) // (SAMPLES_PER_TENSOR - 1)
    return tuple(t.shape), flat[idx].float().cpu().numpy().tobytes()


class SampledTensors(Mapping[str, torch.Tensor]):
    """A (lazy) tensor mapping that remembers the fingerprint sample of every tensor read."""

    def __init__(self, source: Mapping[str, torch.Tensor]):
        self.source = source
        self.samples: dict[str, tuple[tuple[int, ...], bytes]] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.source[key]
        self.samples[key] = tensor_sample(t)
        return t

    def sample(self, key: str) -> tuple[tuple[int, ...], bytes]:
        if key not in self.samples:
            self[key]  # a tensor the builder skipped (rotary buffers): read it now
        return self.samples[key]

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self.source

    def shape(self, key: str) -> tuple[int, ...]:
        shape = getattr(self.source, "shape", None)
        return shape(key) if callable(shape) else tuple(self.source[key].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)


def fingerprint(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    cfg = config.to_dict()
    cfg.pop("default_exit")  # a serving choice, not part of the weights
    digest.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    sampled = tensors if isinstance(tensors, SampledTensors) else None
    for name in sorted(tensors):
        shape, values = sampled.sample(name) if sampled else tensor_sample(tensors[name])
        digest.update(f"{name}:{shape};".encode())
        digest.update(values)
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
