"""Train a trunk probe (torch, CPU) and write it as the ONNX graph `node.probe` runs.

Data: per prompt, the gate's inputs at exit e (`evaluation.features`: pooled boundary states
and first-token confidence, [2 * hidden + 3]) and the target, this exit's greedy agreement with
the deepest exit (a fraction in [0, 1], from `eval exits` results). The head is a logistic
regression (or one hidden ReLU layer) trained full batch with Adam on the soft-label binary
cross-entropy, inputs standardised; the weights' decay (not the biases') is picked by k-fold
cross-validation on the training prompts, so a probe that cannot beat the mean agreement
learns to predict it. The standardisation is folded into the first layer, so the graph is
Gemm (-> Relu -> Gemm) -> Sigmoid with float32 initializers: byte-stable for given weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.node.probe import (
    INPUT_NAME,
    META_EXIT,
    META_FINGERPRINT,
    META_HIDDEN,
    META_KIND,
    META_TRAINING,
    MODEL_KIND,
    OUTPUT_NAME,
)

OPSET = 17
IR_VERSION = 8
DECAYS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # a large decay leaves the mean agreement (bias only)


@dataclass(frozen=True)
class ProbeConfig:
    epochs: int = 400
    lr: float = 0.01
    hidden: int = 0  # 0: logistic regression
    seed: int = 0
    folds: int = 5
    decays: tuple[float, ...] = field(default=DECAYS)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.hidden < 0 or self.folds < 2 or not self.decays:
            raise InvalidRequest("probe training needs epochs >= 1, hidden >= 0, folds >= 2")


class ProbeNet(nn.Module):
    """Standardised features [N, D] -> logits [N, 1]."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("std", torch.from_numpy(std.astype(np.float32)))
        d = mean.shape[0]
        layers = [nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1)] if hidden else []
        self.layers = nn.Sequential(*(layers or [nn.Linear(d, 1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, features: np.ndarray) -> np.ndarray:
        """[N] agreement estimates (what the ONNX graph computes)."""
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        return torch.sigmoid(self(x)).reshape(-1).numpy()


def _fit(x: np.ndarray, y: np.ndarray, decay: float, config: ProbeConfig) -> ProbeNet:
    torch.manual_seed(config.seed)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    net = ProbeNet(mean, std, config.hidden)
    xt, yt = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
    weights = [p for name, p in net.layers.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in net.layers.named_parameters() if name.endswith("bias")]
    groups = [{"params": weights, "weight_decay": decay}, {"params": biases, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    loss_fn = nn.BCEWithLogitsLoss()  # soft targets: the agreement fraction
    for _ in range(config.epochs):
        optimizer.zero_grad()
        loss_fn(net(xt).reshape(-1), yt).backward()
        optimizer.step()
    return net.eval()


def _bce(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


@dataclass(frozen=True)
class TrainedProbe:
    net: ProbeNet
    decay: float
    cv_loss: dict[float, float]  # weight decay -> mean held-out-fold cross-entropy


def train_probe(x: np.ndarray, y: np.ndarray, config: ProbeConfig = ProbeConfig()) -> TrainedProbe:
    """Fit features [N, D] to agreement targets [N] in [0, 1]; weight decay by k-fold CV."""
    if x.ndim != 2 or len(x) != len(y) or len(x) < config.folds:
        raise InvalidRequest(f"need [N, D] features and N >= {config.folds} targets")
    if np.any((y < 0) | (y > 1)):
        raise InvalidRequest("probe targets must be agreements in [0, 1]")
    folds = np.arange(len(x)) % config.folds  # deterministic folds in the order given
    cv = {}
    for decay in config.decays:
        losses = []
        for k in range(config.folds):
            fit, held = folds != k, folds == k
            net = _fit(x[fit], y[fit], decay, config)
            losses.append(_bce(net.predict(x[held]), y[held]))
        cv[decay] = float(np.mean(losses))
    best = min(cv, key=cv.get)
    return TrainedProbe(_fit(x, y, best, config), best, cv)


def build_onnx(
    net: ProbeNet, exit_layer: int, hidden_size: int, fingerprint: str, training: dict
) -> onnx.ModelProto:
    """The probe as `features [N, D] -> agreement [N, 1]` with its metadata (`node.probe`)."""
    linears = [m for m in net.layers if isinstance(m, nn.Linear)]
    mean, std = net.mean.numpy().astype(np.float64), net.std.numpy().astype(np.float64)
    nodes, initializers, current = [], [], INPUT_NAME
    for i, linear in enumerate(linears):
        w = linear.weight.detach().numpy().astype(np.float64)  # [out, in]
        b = linear.bias.detach().numpy().astype(np.float64)  # [out]
        if i == 0:  # fold (x - mean) / std into the first layer: W' = W / std, b' = b - W' mean
            w = w / std
            b = b - w @ mean
        initializers += [numpy_helper.from_array(w.astype(np.float32), f"w{i}")]
        initializers += [numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"gemm{i}"], transB=1))
        current = f"gemm{i}"
        if i < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"]))
            current = f"relu{i}"
    nodes.append(helper.make_node("Sigmoid", [current], [OUTPUT_NAME]))
    dim = mean.shape[0]
    graph = helper.make_graph(
        nodes,
        "ruyiflow_trunk_probe",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", 1])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    meta = {
        META_KIND: MODEL_KIND,
        META_EXIT: str(exit_layer),
        META_HIDDEN: str(hidden_size),
        META_FINGERPRINT: fingerprint,
        META_TRAINING: json.dumps(training, sort_keys=True),
    }
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def write_probe(model: onnx.ModelProto, path: str | Path) -> int:
    """Write the ONNX file; returns its size in bytes."""
    data = model.SerializeToString()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return len(data)
