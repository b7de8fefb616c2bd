"""`manifest.json` of an ONNX branch export: what was exported, the facts a runtime needs, and the
size and sha256 of every file, so a stale or foreign export is refused before it runs.

Torch-free (the ONNX runtime side reads it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ruyiflow.engine.errors import ModelLoadError, ModelMismatch

FORMAT = "ruyiflow-onnx-branch"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
GRAPH_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
QUANTS = (None, "int8", "int4")
HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class BranchFacts:
    """Config facts a runtime needs to feed and read the graph."""

    family: str
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_trunk_layers: int  # = exit; the graph runs these plus one branch layer
    max_context: int  # rows of the RoPE table: positions must stay below it
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype: str  # activations and KV cache

    @property
    def num_kv_layers(self) -> int:
        return self.num_trunk_layers + 1


@dataclass(frozen=True)
class Manifest:
    model_name: str
    fingerprint: str
    exit: int
    exits: tuple[int, ...]
    facts: BranchFacts
    quant: str | None
    opset: int
    onnx_version: str
    onnxruntime_version: str
    ruyiflow_version: str
    overlay: str | None = None  # file name of the exit overlay merged into the branches, if any
    quant_details: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {bytes, sha256}
    graph_file: str = GRAPH_FILE
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format": FORMAT, **d}
        d["interface"] = interface_doc(self.facts)
        return json.dumps(d, indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: Path) -> Manifest:
        if d.get("format") != FORMAT:
            raise ModelLoadError(f"{where}: not a ruyiflow ONNX branch export manifest")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelLoadError(
                f"{where}: manifest format version {version!r} unsupported (this ruyiflow reads"
                f" {FORMAT_VERSION}); re-export the branch"
            )
        try:
            facts = dict(d["facts"])
            facts["eos_token_ids"] = tuple(facts["eos_token_ids"])
            fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            fields.update(facts=BranchFacts(**facts), exits=tuple(d["exits"]))
            manifest = cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{where}: malformed manifest ({exc!r})") from exc
        if manifest.quant not in QUANTS:
            raise ModelLoadError(f"{where}: unknown quant {manifest.quant!r}")
        return manifest


def interface_doc(f: BranchFacts) -> dict[str, Any]:
    """The graph's inputs and outputs, written into the manifest for readers without ruyiflow."""
    kv = f"[batch, {f.num_kv_heads}, past_len, {f.head_dim}]"
    return {
        "graphs": "one graph serves prefill (past_len 0, new_len tokens) and decode (new_len 1)",
        "inputs": {
            "input_ids": "int64 [batch, new_len]",
            "position_ids": "int64 [batch, new_len], each < max_context",
            "attention_mask": "int64 [batch, past_len + new_len]; 1 attend, 0 padding",
            "past.{i}.key / past.{i}.value": f"float32 {kv}, i = 0..{f.num_kv_layers - 1}",
        },
        "outputs": {
            "logits": f"float32 [batch, {f.vocab_size}] of each row's last new position",
            "boundary": f"float32 [batch, new_len, {f.hidden_size}], hidden state entering the"
            " branch layer",
            "present.{i}.key / present.{i}.value": "float32 past concatenated with the new"
            " positions along axis 2; keys after RoPE",
        },
        "kv_layers": f"i < {f.num_trunk_layers}: trunk layer i; i = {f.num_trunk_layers}:"
        " the branch layer",
    }


def file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    path = out_dir / MANIFEST_FILE
    path.write_text(manifest.to_json())
    return path


def read_manifest(export_dir: Path) -> Manifest:
    path = export_dir / MANIFEST_FILE
    if not path.is_file():
        raise ModelLoadError(f"{export_dir}: no {MANIFEST_FILE}; not an ONNX branch export")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(d, dict):
        raise ModelLoadError(f"{path}: manifest must be a JSON object")
    return Manifest.from_dict(d, path)


def check_files(export_dir: Path, manifest: Manifest) -> None:
    """Every listed file present with its recorded size and sha256 (the graph file listed)."""
    if manifest.graph_file not in manifest.files:
        raise ModelLoadError(f"{export_dir}: manifest lists no graph file {manifest.graph_file}")
    for name, want in manifest.files.items():
        path = export_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise ModelLoadError(f"{export_dir}: manifest names a file outside the export: {name}")
        if not path.is_file():
            raise ModelLoadError(f"stale/corrupt export {export_dir}: file {name} is missing")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise ModelLoadError(
                f"stale/corrupt export {export_dir}: {name} has {size} bytes, the manifest"
                f" records {want.get('bytes')}"
            )
        got = file_digest(path)["sha256"]
        if got != want.get("sha256"):
            raise ModelLoadError(
                f"stale/corrupt export {export_dir}: {name} sha256 {got[:16]}... differs from"
                f" the manifest's {str(want.get('sha256'))[:16]}...; re-export the branch"
            )


def check_identity(
    manifest: Manifest, expect_fingerprint: str | None, expect_exit: int | None
) -> None:
    if expect_fingerprint is not None and manifest.fingerprint != expect_fingerprint:
        raise ModelMismatch(
            f"export of another model/exit: fingerprint {manifest.fingerprint} in the export,"
            f" expected {expect_fingerprint}"
        )
    if expect_exit is not None and manifest.exit != expect_exit:
        raise ModelMismatch(
            f"export of another model/exit: exit {manifest.exit} in the export,"
            f" expected {expect_exit}"
        )
