"""Trunk probes at run time (numpy + onnxruntime, no torch): a small classifier on what a node
has already computed when a request's first token is sampled at exit e - the prompt's boundary
states pooled (last and mean, `Engine.prompt_features`) and the first token's confidence - that
predicts how much of this exit's output agrees with the deepest exit's.

File: one ONNX graph `features [N, 2 * hidden + 3]` -> `agreement [N, 1]` in [0, 1] (a logistic
or one-hidden-layer head; written by `ruyiflow train-probe`), named `probe-e{exit}.onnx`, whose
metadata names the kind, the exit, the hidden size and the fingerprint of the weights it was
trained on. A probe for other weights is refused (ModelMismatch), never run. The embedded family's
probes ship beside its exit overlay (`engine/overlays/smollm2-probes/`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from ruyiflow.engine.errors import ModelLoadError, ModelMismatch

MODEL_KIND = "ruyiflow-trunk-probe"
INPUT_NAME = "features"
OUTPUT_NAME = "agreement"
META_KIND = "ruyiflow.kind"
META_EXIT = "ruyiflow.exit"
META_HIDDEN = "ruyiflow.hidden_size"
META_FINGERPRINT = "ruyiflow.fingerprint"
META_TRAINING = "ruyiflow.training"  # JSON: prompts, split, loss... (informative)


def shipped_probes_dir() -> Path:
    """Where the embedded family's probes ship (inside the installed `ruyiflow.engine`)."""
    import ruyiflow.engine

    return Path(ruyiflow.engine.__file__).parent / "overlays" / "smollm2-probes"


def probe_path(directory: str | Path, exit_layer: int) -> Path:
    return Path(directory) / f"probe-e{exit_layer}.onnx"


def file_digest(path: str | Path) -> str:
    """The digest a calibration names its probe by (sha256 of the file, 16 hex digits)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def probe_input(pooled: np.ndarray, max_prob: float, margin: float, entropy: float) -> np.ndarray:
    """[2 * hidden + 3] float32: pooled boundary states, then the first token's confidence."""
    tail = np.array([max_prob, margin, entropy], np.float32)
    return np.concatenate([np.asarray(pooled, np.float32).reshape(-1), tail])


class Probe:
    """One exit's probe, loaded and checked; `predict` gives agreement estimates in [0, 1]."""

    def __init__(self, path: str | Path, fingerprint: str | None = None) -> None:
        import onnxruntime as ort  # only nodes and tools that use a probe pay for it

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"probe {self.path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a [1, D] product: threads only add latency
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types for unreadable files
            raise ModelLoadError(f"{self.path}: cannot load ONNX model: {exc}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.exit, self.hidden_size, self.fingerprint = _check_metadata(meta, self.path)
        self.num_features = 2 * self.hidden_size + 3
        inputs = self.session.get_inputs()
        shape = [self.num_features]
        if [i.name for i in inputs] != [INPUT_NAME] or list(inputs[0].shape)[1:] != shape:
            raise ModelLoadError(f"{self.path}: expected one input {INPUT_NAME} [N, {shape[0]}]")
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise ModelMismatch(
                f"probe {self.path} was trained for model {self.fingerprint}, this model is "
                f"{fingerprint}; retrain it with `ruyiflow train-probe`"
            )
        self.digest = file_digest(self.path)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """[N] agreement estimates of features [N, D] (or [D])."""
        x = np.ascontiguousarray(np.atleast_2d(features), dtype=np.float32)
        if x.shape[1] != self.num_features:
            raise ModelLoadError(f"probe takes {self.num_features} features, got {x.shape[1]}")
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})  # [N, 1]
        return out.reshape(-1).astype(np.float64)


def _check_metadata(meta: dict[str, Any], path: Path) -> tuple[int, int, str]:
    def fail(problem: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: not a usable ruyiflow trunk probe: {problem}")

    if meta.get(META_KIND) != MODEL_KIND:
        raise fail(f"metadata {META_KIND} is {meta.get(META_KIND)!r}, expected {MODEL_KIND!r}")
    try:
        exit_layer, hidden = int(meta[META_EXIT]), int(meta[META_HIDDEN])
    except (KeyError, ValueError):
        raise fail(f"metadata {META_EXIT} / {META_HIDDEN} missing or not integers") from None
    fingerprint = meta.get(META_FINGERPRINT, "")
    if exit_layer < 1 or hidden < 1 or not fingerprint:
        raise fail("exit, hidden size and fingerprint must be set")
    return exit_layer, hidden, fingerprint


def load_probes(
    directory: str | Path, exits: tuple[int, ...], fingerprint: str
) -> dict[int, Probe]:
    """The probes of `exits` found in `directory` (missing ones are skipped), each checked
    against `fingerprint`."""
    found = {}
    for exit_layer in exits:
        path = probe_path(directory, exit_layer)
        if path.is_file():
            probe = Probe(path, fingerprint)
            if probe.exit != exit_layer:
                raise ModelLoadError(f"{path} is a probe for exit {probe.exit}")
            found[exit_layer] = probe
    return found
