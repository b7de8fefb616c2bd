"""Exit overlays at load time: trained branch deltas stored apart from the base weights.

One safetensors file holds, per trained exit `e`, LoRA factors `exit.{e}.{proj}.lora_A` [r, in]
and `exit.{e}.{proj}.lora_B` [out, r] for the seven projections of the branch layer, and the full
norm vectors `exit.{e}.{input_norm|post_norm|norm}.weight` [hidden]. Its metadata header names
the format and version, the fingerprint of the base model it was trained on, the exits, the
rank and the LoRA scale. Applying it merges W + scale * B @ A into a new copy of each exit's
branch layer; the trunk and every other exit keep their tensors.

Reading and merging live here (every model load may apply one); writing and training live in
`ruyiflow.distill`, which serving never imports.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ruyiflow.engine.errors import ModelLoadError, ModelMismatch
from ruyiflow.engine.layers import Geometry, LayerWeights
from ruyiflow.engine.model import Branch, FamilyModel

# projection -> (fused LayerWeights field, index of its block of rows within that field)
PROJECTIONS = {
    "q_proj": ("w_qkv", 0),
    "k_proj": ("w_qkv", 1),
    "v_proj": ("w_qkv", 2),
    "o_proj": ("w_o", 0),
    "gate_proj": ("w_gate_up", 0),
    "up_proj": ("w_gate_up", 1),
    "down_proj": ("w_down", 0),
}
# trained norm vectors: the branch layer's two norms and the exit's final norm
NORMS = ("input_norm", "post_norm", "norm")


def row_blocks(field: str, geo: Geometry, rows: int) -> list[int]:
    """Row counts of the projections fused in `field` ([q, k, v] or [gate, up])."""
    if field == "w_qkv":
        kv = geo.num_kv_heads * geo.head_dim
        return [geo.num_heads * geo.head_dim, kv, kv]
    if field == "w_gate_up":
        return [rows // 2, rows // 2]
    return [rows]


def projection_weight(layer: LayerWeights, name: str, geo: Geometry) -> torch.Tensor:
    """The [out, in] weight of one HF projection, a view into the fused tensor."""
    field, block = PROJECTIONS[name]
    weight = getattr(layer, field)
    sizes = row_blocks(field, geo, weight.shape[0])
    return weight.split(sizes)[block]


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


def merged_branch(
    model: FamilyModel,
    exit_layer: int,
    lora_a: dict[str, torch.Tensor],
    lora_b: dict[str, torch.Tensor],
    norms: dict[str, torch.Tensor],
    scale: float,
) -> Branch:
    """A new Branch for `exit_layer` with W + scale * B @ A per projection and the given norm
    vectors, in the model's dtype. The trunk layer of the same index keeps its own tensors (a
    plain model's branch layer starts as that very layer), so deeper exits are unchanged."""
    base = model.branches[exit_layer]
    geo, dtype, device = model.geo, model.dtype, model.device
    fields = {}
    with torch.no_grad():
        for field in ("w_qkv", "w_o", "w_gate_up", "w_down"):
            names = [n for n, (f, _) in PROJECTIONS.items() if f == field]
            parts = [
                projection_weight(base.layer, n, geo).float()
                + scale * (lora_b[n].to(device).float() @ lora_a[n].to(device).float())
                for n in names
            ]
            fields[field] = torch.cat(parts).to(dtype).contiguous()
        vectors = {k: norms[k].detach().to(device, dtype).clone() for k in NORMS}
    layer = LayerWeights(
        input_norm=vectors["input_norm"],
        post_norm=vectors["post_norm"],
        w_qkv=fields["w_qkv"],
        b_qkv=base.layer.b_qkv,
        w_o=fields["w_o"],
        q_norm=base.layer.q_norm,
        k_norm=base.layer.k_norm,
        w_gate_up=fields["w_gate_up"],
        w_down=fields["w_down"],
    )
    return Branch(layer, vectors["norm"], base.head)


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
