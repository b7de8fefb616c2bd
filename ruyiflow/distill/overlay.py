"""Writing exit overlays (the format and loading are `ruyiflow.engine.overlay`'s)."""

from __future__ import annotations

from pathlib import Path

import torch

from ruyiflow.distill.branch import LoraBranch
from ruyiflow.engine.overlay import NORMS, PROJECTIONS, OverlayMeta


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
