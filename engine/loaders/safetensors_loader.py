"""Read Hugging Face safetensors checkpoints (single file or sharded with an index), mapped from
disk with `safe_open` so only the tensors we convert are paged in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ruyiflow.engine.errors import ModelLoadError

INDEX_NAME = "model.safetensors.index.json"


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, validated against its index."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: corrupt index ({exc})") from exc
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: shard files missing: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"{path}: no model.safetensors, {INDEX_NAME} or *.safetensors found")
    return found


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint by key; a key in two shards is an error."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise ModelLoadError(f"{file.name}: tensor {key!r} appears in two shards")
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{file}: cannot read safetensors ({exc})") from exc
    return tensors
