"""Exit overlays: trained branch deltas stored apart from the base weights.

One safetensors file holds, per trained exit `e`, LoRA factors `exit.{e}.{proj}.lora_A` [r, in]
and `exit.{e}.{proj}.lora_B` [out, r] for the seven projections of the branch layer, and the full
norm vectors `exit.{e}.{input_norm|post_norm|norm}.weight` [hidden]. Its metadata header names
the format and version, the fingerprint of the base model it was trained on, the exits, the
rank and the LoRA scale. Applying it merges W + scale * B @ A into a new copy of each exit's
branch layer; the trunk and every other exit keep their tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.distill.branch import NORMS, PROJECTIONS, LoraBranch, merged_branch, projection_weight
from engine.errors import ModelLoadError, ModelMismatch
from engine.model import FamilyModel

FORMAT = "ruyiflow-exit-overlay"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class OverlayMeta:
    base_fingerprint: str
    exits: tuple[int, ...]
    rank: int
    scale: float  # alpha / rank
    training: dict[str, Any] = field(default_factory=dict)  # steps, tokens, seed... (informative)

    def __post_init__(self) -> None:
        if not self.exits or list(self.exits) != sorted(set(self.exits)):
            raise ModelLoadError(f"overlay exits must be ascending and unique, got {self.exits}")
        if self.rank < 1:
            raise ModelLoadError(f"overlay rank must be >= 1, got {self.rank}")
        if not math.isfinite(self.scale):
            raise ModelLoadError("overlay scale must be finite")

    def to_metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "base_fingerprint": self.base_fingerprint,
            "exits": json.dumps(list(self.exits)),
            "rank": str(self.rank),
            "scale": repr(self.scale),
            "training": json.dumps(self.training, sort_keys=True),
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, str] | None, where: str) -> OverlayMeta:
        meta = meta or {}
        if meta.get("format") != FORMAT:
            raise ModelLoadError(f"{where}: not a ruyiflow exit overlay (format {FORMAT!r})")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise ModelLoadError(
                f"{where}: overlay format version {meta.get('format_version')!r} unsupported "
                f"(this build reads {FORMAT_VERSION})"
            )
        try:
            return cls(
                base_fingerprint=meta["base_fingerprint"],
                exits=tuple(int(e) for e in json.loads(meta["exits"])),
                rank=int(meta["rank"]),
                scale=float(meta["scale"]),
                training=json.loads(meta.get("training", "{}")),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ModelLoadError(f"{where}: bad overlay metadata ({exc!r})") from exc


@dataclass
class Overlay:
    meta: OverlayMeta
    tensors: dict[str, torch.Tensor]
    source: str = "<memory>"

    def factors(self, exit_layer: int) -> tuple[dict[str, torch.Tensor], ...]:
        """(A, B, norms) of one exit, keyed by projection / norm name."""
        p = f"exit.{exit_layer}"
        a = {n: self._get(f"{p}.{n}.lora_A") for n in PROJECTIONS}
        b = {n: self._get(f"{p}.{n}.lora_B") for n in PROJECTIONS}
        return a, b, {n: self._get(f"{p}.{n}.weight") for n in NORMS}

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ModelLoadError(f"{self.source}: overlay is missing tensor {key!r}")
        return self.tensors[key]


def overlay_tensors(loras: dict[int, LoraBranch]) -> dict[str, torch.Tensor]:
    """Trained deltas -> overlay tensor dict (float32)."""
    out = {}
    for e, lora in sorted(loras.items()):
        a, b, norms = lora.factors()
        for n in PROJECTIONS:
            out[f"exit.{e}.{n}.lora_A"] = a[n]
            out[f"exit.{e}.{n}.lora_B"] = b[n]
        for n in NORMS:
            out[f"exit.{e}.{n}.weight"] = norms[n]
    return out


def save_overlay(
    path: Path,
    meta: OverlayMeta,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write atomically (temporary file + rename) in `dtype` (float16 keeps it a few MB)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    stored = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    save_file(stored, str(tmp), metadata=meta.to_metadata())
    tmp.replace(path)


def read_overlay(path: str | Path) -> Overlay:
    """Read and validate an overlay file (metadata, finite values, expected keys per exit)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"{path}: overlay file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ModelLoadError(f"{path}: unreadable overlay ({exc})") from exc
    meta = OverlayMeta.from_metadata(raw_meta, str(path))
    overlay = Overlay(meta, tensors, str(path))
    expected = set()
    for e in meta.exits:
        a, b, norms = overlay.factors(e)  # raises on a missing key
        expected |= {f"exit.{e}.{n}.lora_A" for n in a} | {f"exit.{e}.{n}.lora_B" for n in b}
        expected |= {f"exit.{e}.{n}.weight" for n in norms}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise ModelLoadError(f"{path}: unexpected overlay tensors {extra[:5]}")
    bad = [k for k, t in tensors.items() if not torch.isfinite(t.float()).all()]
    if bad:
        raise ModelLoadError(f"{path}: non-finite values in overlay tensors {bad[:5]}")
    return overlay


def check_overlay(model: FamilyModel, overlay: Overlay, base_fingerprint: str) -> None:
    """Refuse an overlay made for other weights, other exits, or with wrong shapes."""
    meta, c = overlay.meta, model.config
    if meta.base_fingerprint != base_fingerprint:
        raise ModelMismatch(
            f"{overlay.source}: overlay was trained on base model {meta.base_fingerprint}, "
            f"this model is {base_fingerprint}"
        )
    shallow = [e for e in c.exits if e != c.last_exit]
    bad = [e for e in meta.exits if e not in shallow]
    if bad:
        raise ModelMismatch(
            f"{overlay.source}: overlay exits {bad} are not shallow exits of this model {shallow}"
        )
    for e in meta.exits:
        layer = model.branches[e].layer
        a, b, norms = overlay.factors(e)
        for n in PROJECTIONS:
            out_dim, in_dim = projection_weight(layer, n, model.geo).shape
            want = {"lora_A": (meta.rank, in_dim), "lora_B": (out_dim, meta.rank)}
            for kind, t in (("lora_A", a[n]), ("lora_B", b[n])):
                if tuple(t.shape) != want[kind]:
                    raise ModelLoadError(
                        f"{overlay.source}: exit.{e}.{n}.{kind} has shape {tuple(t.shape)}, "
                        f"expected {want[kind]}"
                    )
        for n, t in norms.items():
            if tuple(t.shape) != (c.hidden_size,):
                raise ModelLoadError(
                    f"{overlay.source}: exit.{e}.{n}.weight has shape {tuple(t.shape)}, "
                    f"expected ({c.hidden_size},)"
                )


def apply_overlay(model: FamilyModel, overlay: Overlay, base_fingerprint: str) -> None:
    """Validate, then replace each overlay exit's branch by its merged copy (in place)."""
    check_overlay(model, overlay, base_fingerprint)
    for e in overlay.meta.exits:
        a, b, norms = overlay.factors(e)
        model.branches[e] = merged_branch(model, e, a, b, norms, overlay.meta.scale)
