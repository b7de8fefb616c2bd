"""Train the difficulty classifier: features of a prompt → its label exit (torch, CPU).

A multinomial logistic regression (`hidden=0`) or a one-hidden-layer MLP, trained full batch
with Adam and weight decay: the prompt sets are hundreds of examples, so one batch is the whole
set and a run takes about a second. Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ruyiflow.engine.errors import InvalidRequest


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 300  # full-batch steps
    seed: int = 0
    hidden: int = 0  # 0: logistic regression; > 0: MLP width
    lr: float = 0.05
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise InvalidRequest(f"epochs must be >= 1, got {self.epochs}")
        if self.hidden < 0:
            raise InvalidRequest(f"hidden must be >= 0, got {self.hidden}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise InvalidRequest("lr must be > 0 and weight_decay >= 0")


class Classifier(nn.Module):
    """features [N, D] → logits [N, K]; `probabilities` adds the softmax the ONNX graph has."""

    def __init__(self, num_features: int, num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.num_features, self.num_classes, self.hidden = num_features, num_classes, hidden
        if hidden:
            self.layers = nn.Sequential(
                nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )
        else:
            self.layers = nn.Sequential(nn.Linear(num_features, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)

    @torch.no_grad()
    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """[N, K] float32 class probabilities of numpy features [N, D]."""
        logits = self(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return torch.softmax(logits, dim=-1).numpy()

    def linear_layers(self) -> list[nn.Linear]:
        return [m for m in self.layers if isinstance(m, nn.Linear)]


def train_classifier(
    features: np.ndarray, labels: np.ndarray, num_classes: int, config: TrainConfig
) -> Classifier:
    """Fit a Classifier to features [N, D] float32 and class indices labels [N] in 0..K-1."""
    if features.ndim != 2 or len(features) == 0 or len(features) != len(labels):
        raise InvalidRequest(
            f"need [N, D] features and N labels, got {features.shape}, {len(labels)}"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise InvalidRequest(f"labels must be class indices in 0..{num_classes - 1}")
    torch.manual_seed(config.seed)
    model = Classifier(features.shape[1], num_classes, config.hidden)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))  # [N, D]
    y = torch.from_numpy(labels.astype(np.int64))  # [N]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(config.epochs):
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
    return model.eval()


@dataclass(frozen=True)
class Accuracy:
    """How well predicted exits match label exits on a set."""

    num: int
    exact: float  # argmax class == label
    within_one: float  # argmax class is the label or a neighbour
    majority: float  # always predicting the set's most common label (the baseline)

    def line(self) -> str:
        return (
            f"{self.num} prompts: accuracy {self.exact:.3f}, within one exit "
            f"{self.within_one:.3f}, majority baseline {self.majority:.3f}"
        )


def accuracy(probs: np.ndarray, labels: np.ndarray) -> Accuracy:
    """Accuracy of probabilities [N, K] against class indices [N]."""
    predicted = probs.argmax(axis=1)
    majority = np.bincount(labels).max() / len(labels)
    return Accuracy(
        num=len(labels),
        exact=float(np.mean(predicted == labels)),
        within_one=float(np.mean(np.abs(predicted - labels) <= 1)),
        majority=float(majority),
    )
