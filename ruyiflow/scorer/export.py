"""Export a trained Classifier to the ONNX model `router.learned_scorer` loads.

The graph is built with onnx.helper (no torch.onnx tracing: it is three ops, and this keeps the
file byte-stable for a given set of weights): `features [batch, D]` → Gemm (→ Relu → Gemm) →
Softmax → `probabilities [batch, K]`. Weights are float32 initializers. Opset 17 / IR 8 so any
onnxruntime >= 1.14 loads it. Metadata: kind, feature version and dimension, classes (exits).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ruyiflow.router.features import FEATURE_DIM, FEATURE_VERSION
from ruyiflow.router.learned_scorer import (
    INPUT_NAME,
    META_CLASSES,
    META_FEATURE_DIM,
    META_FEATURE_VERSION,
    META_KIND,
    META_MODEL,
    MODEL_KIND,
    OUTPUT_NAME,
)
from ruyiflow.scorer.train import Classifier

OPSET = 17
IR_VERSION = 8


def build_model(
    classifier: Classifier, classes: tuple[int, ...], model_name: str | None = None
) -> onnx.ModelProto:
    """The ONNX model of `classifier` whose K outputs are the exits `classes` (shallow first)."""
    if classifier.num_features != FEATURE_DIM:
        raise ValueError(f"classifier takes {classifier.num_features} features, not {FEATURE_DIM}")
    if classifier.num_classes != len(classes):
        raise ValueError(f"classifier has {classifier.num_classes} classes for exits {classes}")
    nodes, initializers = [], []
    current = INPUT_NAME
    linears = classifier.linear_layers()
    for i, linear in enumerate(linears):
        weight = linear.weight.detach().numpy().astype(np.float32)  # [out, in]
        bias = linear.bias.detach().numpy().astype(np.float32)  # [out]
        initializers += [numpy_helper.from_array(weight, f"w{i}")]
        initializers += [numpy_helper.from_array(bias, f"b{i}")]
        # Gemm with transB: [batch, in] @ [out, in]^T + [out] → [batch, out]
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"gemm{i}"], transB=1))
        current = f"gemm{i}"
        if i < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"]))
            current = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [current], [OUTPUT_NAME], axis=-1))
    graph = helper.make_graph(
        nodes,
        "ruyiflow_difficulty_scorer",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", FEATURE_DIM])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", len(classes)])],
        initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="ruyiflow"
    )
    model.ir_version = IR_VERSION
    metadata = {
        META_KIND: MODEL_KIND,
        META_FEATURE_VERSION: FEATURE_VERSION,
        META_FEATURE_DIM: str(FEATURE_DIM),
        META_CLASSES: json.dumps(list(classes)),
    }
    if model_name:
        metadata[META_MODEL] = model_name
    helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_classifier(
    classifier: Classifier,
    classes: tuple[int, ...],
    path: str | Path,
    model_name: str | None = None,
) -> int:
    """Write the ONNX model to `path` (parent dirs created); returns its size in bytes."""
    data = build_model(classifier, classes, model_name).SerializeToString()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)
