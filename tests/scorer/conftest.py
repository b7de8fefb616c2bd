"""Fixtures for scorer tests: synthetic results files and one trained, exported scorer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.scorer.synthetic import make_records, write_jsonl


@pytest.fixture(scope="session")
def results_files(tmp_path_factory) -> tuple[Path, Path]:
    """(train, held-out) synthetic results files: 30 and 10 prompts per label exit."""
    root = tmp_path_factory.mktemp("results")
    train = write_jsonl(root / "train.jsonl", make_records(30, seed=1))
    heldout = write_jsonl(root / "heldout.jsonl", make_records(10, seed=2))
    return train, heldout


@pytest.fixture(scope="session")
def trained(results_files, tmp_path_factory):
    """(classifier, classes, onnx path, train features, train labels) of a logistic regression."""
    from ruyiflow.cmd_train_scorer import labelled
    from ruyiflow.scorer.export import export_classifier
    from ruyiflow.scorer.train import TrainConfig, train_classifier

    features, labels, classes, _ = labelled(str(results_files[0]))
    classifier = train_classifier(features, labels, len(classes), TrainConfig(epochs=200))
    path = tmp_path_factory.mktemp("model") / "scorer.onnx"
    export_classifier(classifier, classes, path, "smollm2")
    return classifier, classes, path, features, labels
