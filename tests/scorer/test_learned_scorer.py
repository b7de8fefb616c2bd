"""The learned scorer: training learns a separable task, the ONNX model computes what the torch
classifier does, foreign or broken models are refused, and the router loads it without torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.router.features import FEATURE_DIM, featurize_batch, user_prompt
from ruyiflow.router.learned_scorer import META_FEATURE_DIM, META_FEATURE_VERSION, LearnedScorer
from ruyiflow.router.scorers import make_scorer, scorer_names
from tests.scorer.synthetic import EXITS, make_prompt


def test_training_learns_a_separable_task(trained, results_files) -> None:
    from ruyiflow.cmd_train_scorer import labelled
    from ruyiflow.scorer.train import accuracy

    classifier, classes, _, features, labels = trained
    assert classes == EXITS
    assert accuracy(classifier.probabilities(features), labels).exact == 1.0
    held_features, held_labels, _, _ = labelled(str(results_files[1]), classes)
    held = accuracy(classifier.probabilities(held_features), held_labels)
    assert held.exact >= 0.9 and held.exact > 2 * held.majority


@pytest.mark.parametrize("hidden", [0, 8])
def test_onnx_probabilities_equal_torch(trained, tmp_path, hidden) -> None:
    from ruyiflow.scorer.export import export_classifier
    from ruyiflow.scorer.train import TrainConfig, train_classifier

    _, classes, _, features, labels = trained
    classifier = train_classifier(
        features, labels, len(classes), TrainConfig(epochs=20, hidden=hidden, seed=3)
    )
    path = tmp_path / "s.onnx"
    export_classifier(classifier, classes, path)
    scorer = LearnedScorer(path)
    (onnx_probs,) = scorer.session.run(["probabilities"], {"features": features})
    np.testing.assert_allclose(onnx_probs, classifier.probabilities(features), atol=1e-6)
    conversation = user_prompt("Prove that the sum of two even numbers is even.")
    expected = classifier.probabilities(featurize_batch([conversation]))[0]
    np.testing.assert_allclose(scorer.probabilities(conversation), expected, atol=1e-6)
    ranks = np.arange(len(classes)) / (len(classes) - 1)
    assert scorer.score(conversation) == pytest.approx(float(expected @ ranks), abs=1e-6)


def test_scores_order_prompts_by_label(trained) -> None:
    import random

    scorer = make_scorer("learned", str(trained[2]))
    assert "learned" in scorer_names() and isinstance(scorer, LearnedScorer)
    rng = random.Random(7)
    means = []
    for label in EXITS:
        scores = [scorer.score(user_prompt(make_prompt(label, rng))) for _ in range(10)]
        assert all(0.0 <= s <= 1.0 for s in scores)
        means.append(sum(scores) / len(scores))
    assert means == sorted(means) and means[0] < 0.2 and means[-1] > 0.8
    assert scorer.predicted_exit(user_prompt(make_prompt(29, rng))) == 29
    assert scorer.model_name == "smollm2"


def _with_metadata(path, tmp_path, **changes: str):
    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(changes)
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    out = tmp_path / "changed.onnx"
    onnx.save(model, str(out))
    return out


def test_bad_models_are_refused_clearly(trained, tmp_path) -> None:
    path = trained[2]
    with pytest.raises(ModelLoadError, match="does not exist"):
        LearnedScorer(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model at all")
    with pytest.raises(ModelLoadError, match="cannot load ONNX model"):
        LearnedScorer(garbage)
    cases = [
        ({META_FEATURE_VERSION: "ruyiflow-features-0"}, "trained on features"),
        ({META_FEATURE_DIM: "100"}, "feature dimension"),
        ({"ruyiflow.classes": "[29, 12]"}, "strictly increasing"),
        ({"ruyiflow.classes": "[12, 16, 20]"}, "output shape"),
        ({"ruyiflow.classes": "nope"}, "not a JSON list"),
        ({"ruyiflow.kind": "something-else"}, "ruyiflow.kind"),
    ]
    for changes, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            LearnedScorer(_with_metadata(path, tmp_path, **changes))


def test_foreign_onnx_model_is_refused(tmp_path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FEATURE_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, FEATURE_DIM])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "foreign.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="not a usable ruyiflow difficulty scorer"):
        make_scorer("learned", str(path))


def test_router_imports_learned_scorer_without_torch(trained) -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import ruyiflow.router.daemon\n"
        "from ruyiflow.router.scorers import make_scorer\n"
        f"scorer = make_scorer('learned', {str(trained[2])!r})\n"
        "print(scorer.score([{'role': 'user', 'content': 'Hello!'}]))\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch', 'transformers'))"
        " and sys.modules[m] is not None))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    score, modules = result.stdout.strip().splitlines()
    assert 0.0 <= float(score) <= 1.0 and modules == "[]"


def test_train_scorer_command(results_files, tmp_path, capsys) -> None:
    import argparse

    from ruyiflow import cmd_train_scorer
    from ruyiflow.engine.errors import InvalidRequest
    from tests.scorer.synthetic import make_records, write_jsonl

    parser = argparse.ArgumentParser()
    cmd_train_scorer.add_arguments(parser)
    out = tmp_path / "scorer.onnx"
    train, heldout = (str(p) for p in results_files)
    with pytest.raises(InvalidRequest, match="no prompt has a checkable answer"):
        cmd_train_scorer.run(parser.parse_args(["--results", train, "--out", str(out)]))
    argv = ["--results", train, "--out", str(out), "--epochs", "150", "--label", "agreement"]
    argv += ["--heldout", heldout]
    assert cmd_train_scorer.run(parser.parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "150 prompts, label exits: 12: 30, 16: 30, 20: 30, 24: 30, 29: 30" in printed
    assert "held-out 50 prompts: accuracy" in printed and "score latency" in printed
    held = float(printed.split("held-out 50 prompts: accuracy ")[1].split(",")[0])
    assert held >= 0.9
    assert LearnedScorer(out).classes == EXITS and out.stat().st_size < 64 << 10
    other = write_jsonl(tmp_path / "other.jsonl", make_records(2, seed=3, exits=(12, 29)))
    argv[-1] = str(other)
    with pytest.raises(InvalidRequest, match="differ from training"):
        cmd_train_scorer.run(parser.parse_args(argv))
