"""The `learned` difficulty scorer: an ONNX classifier over `router.features`, run with
onnxruntime and numpy only (the router process never imports torch).

The model (written by `ruyiflow train-scorer`) maps features `[N, FEATURE_DIM]` float32 to
probabilities `[N, K]` over the label exits (the shallowest exit whose answer matches the deepest
one's). Its metadata records what it was trained on; a model whose kind, feature version,
dimension, classes or graph shapes differ is refused with ModelLoadError, never run.

score = expected class rank / (K - 1) = Σ_k p_k · k / (K - 1): 0 when the shallowest exit surely
suffices, 1 when only the deepest will do. Ranks rather than layer indices keep the scale even when
exits are unevenly spaced; `ruyiflow calibrate` then places the thresholds on this scale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.router.features import FEATURE_DIM, FEATURE_VERSION, featurize
from ruyiflow.router.scorer import Scorer

MODEL_KIND = "ruyiflow-difficulty-scorer"
INPUT_NAME = "features"
OUTPUT_NAME = "probabilities"
# Metadata keys in the ONNX model (metadata_props); values are strings.
META_KIND = "ruyiflow.kind"
META_FEATURE_VERSION = "ruyiflow.feature_version"
META_FEATURE_DIM = "ruyiflow.feature_dim"
META_CLASSES = "ruyiflow.classes"  # JSON list of exits, shallow first
META_MODEL = "ruyiflow.model"  # which model's exits the labels name (informational)
SHIPPED_MODEL = Path(__file__).parent / "models" / "scorer-smollm2.onnx"


def read_metadata(session: Any, path: Path) -> tuple[int, ...]:
    """Validate an onnxruntime session's metadata and graph; returns the classes (exits)."""
    meta = session.get_modelmeta().custom_metadata_map

    def fail(problem: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: not a usable ruyiflow difficulty scorer: {problem}")

    if meta.get(META_KIND) != MODEL_KIND:
        raise fail(f"metadata {META_KIND} is {meta.get(META_KIND)!r}, expected {MODEL_KIND!r}")
    version = meta.get(META_FEATURE_VERSION)
    if version != FEATURE_VERSION:
        raise fail(f"trained on features {version!r}, this router computes {FEATURE_VERSION!r}")
    if meta.get(META_FEATURE_DIM) != str(FEATURE_DIM):
        raise fail(f"feature dimension {meta.get(META_FEATURE_DIM)!r}, expected {FEATURE_DIM}")
    try:
        classes = tuple(json.loads(meta.get(META_CLASSES, "")))
    except ValueError:
        raise fail(f"metadata {META_CLASSES} is not a JSON list") from None
    if len(classes) < 2 or not all(type(c) is int and c >= 1 for c in classes):
        raise fail(f"classes {list(classes)} must be two or more exits (layer indices >= 1)")
    if list(classes) != sorted(set(classes)):
        raise fail(f"classes {list(classes)} must be strictly increasing")
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or inputs[0].type != "tensor(float)":
        raise fail(f"expected one float input {INPUT_NAME!r}")
    if list(inputs[0].shape)[1:] != [FEATURE_DIM]:
        raise fail(f"input shape {inputs[0].shape}, expected [batch, {FEATURE_DIM}]")
    if OUTPUT_NAME not in [o.name for o in outputs]:
        raise fail(f"no output {OUTPUT_NAME!r}")
    shape = next(o.shape for o in outputs if o.name == OUTPUT_NAME)
    if list(shape)[1:] != [len(classes)]:
        raise fail(f"output shape {shape}, expected [batch, {len(classes)}]")
    return classes


class LearnedScorer(Scorer):
    """Difficulty from an ONNX classifier (module docstring). `path` defaults to the scorer
    shipped for the embedded SmolLM2 family."""

    def __init__(self, path: str | Path | None = None) -> None:
        import onnxruntime as ort  # here, not at import: only routers that use it pay for it

        self.path = Path(path) if path is not None else SHIPPED_MODEL
        if not self.path.is_file():
            raise ModelLoadError(f"learned scorer model {self.path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # a [1, D] x [D, K] product: threads only add latency
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types for unreadable files
            raise ModelLoadError(f"{self.path}: cannot load ONNX model: {exc}") from None
        self.classes = read_metadata(self.session, self.path)
        self.model_name = self.session.get_modelmeta().custom_metadata_map.get(META_MODEL)
        self._ranks = np.arange(len(self.classes), dtype=np.float64) / (len(self.classes) - 1)

    def probabilities(
        self, messages: list[dict[str, Any]], enable_thinking: bool | None = None
    ) -> np.ndarray:
        """[K] probabilities of each class (exit) being the label exit."""
        features = featurize(messages, enable_thinking)[None, :]  # [1, FEATURE_DIM]
        (probs,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: features})  # [1, K]
        return probs[0]

    def predicted_exit(
        self, messages: list[dict[str, Any]], enable_thinking: bool | None = None
    ) -> int:
        """The most probable label exit."""
        return self.classes[int(np.argmax(self.probabilities(messages, enable_thinking)))]

    def score(self, messages: list[dict[str, Any]], enable_thinking: bool | None = None) -> float:
        probs = self.probabilities(messages, enable_thinking).astype(np.float64)
        if not np.all(np.isfinite(probs)):
            raise ModelLoadError(f"{self.path}: the scorer produced non-finite probabilities")
        expected = float(probs @ self._ranks / max(float(probs.sum()), 1e-12))
        return min(1.0, max(0.0, expected))
