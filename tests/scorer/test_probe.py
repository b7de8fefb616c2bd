"""Trunk probes: training picks the weight decay by cross-validation, the ONNX graph computes
what the torch model does (logistic and one hidden layer), metadata is checked, and a probe for
other weights is refused."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ruyiflow.engine.errors import ModelLoadError, ModelMismatch
from ruyiflow.node.probe import Probe, load_probes, probe_input, probe_path
from ruyiflow.scorer.probe_train import ProbeConfig, build_onnx, train_probe, write_probe

HIDDEN = 6  # pooled features 2 * 6, plus 3 confidences


def synthetic(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pooled = rng.normal(size=(n, 2 * HIDDEN)).astype(np.float32) * 3 + 1
    conf = rng.random((n, 3)).astype(np.float32)
    x = np.stack([probe_input(p, *c) for p, c in zip(pooled, conf, strict=True)])
    y = 1 / (1 + np.exp(-(2 * pooled[:, 0] / 3 + 3 * conf[:, 0] - 2)))  # soft agreement
    return x, y.astype(np.float32)


@pytest.mark.parametrize("hidden", [0, 8])
def test_onnx_round_trip_is_identical(tmp_path, hidden) -> None:
    x, y = synthetic()
    config = ProbeConfig(epochs=150, hidden=hidden, folds=3, decays=(1e-3, 1.0))
    trained = train_probe(x, y, config)
    assert set(trained.cv_loss) == {1e-3, 1.0} and trained.decay in trained.cv_loss
    model = build_onnx(trained.net, 16, HIDDEN, "fp-1", {"prompts": len(x)})
    path = probe_path(tmp_path, 16)
    assert write_probe(model, path) == path.stat().st_size
    probe = Probe(path, "fp-1")
    assert (probe.exit, probe.hidden_size, probe.num_features) == (16, HIDDEN, 2 * HIDDEN + 3)
    fresh, _ = synthetic(50, seed=1)
    np.testing.assert_allclose(probe.predict(fresh), trained.net.predict(fresh), atol=1e-6)
    assert np.corrcoef(probe.predict(x), y)[0, 1] > 0.8  # it learnt the signal
    assert list(load_probes(tmp_path, (12, 16), "fp-1")) == [16]


def test_refuses_other_weights_and_foreign_files(tmp_path) -> None:
    x, y = synthetic()
    trained = train_probe(x, y, ProbeConfig(epochs=20, folds=2, decays=(0.1,)))
    path = probe_path(tmp_path, 12)
    write_probe(build_onnx(trained.net, 12, HIDDEN, "fp-1", {}), path)
    with pytest.raises(ModelMismatch, match="retrain"):
        Probe(path, "fp-2")
    model = onnx.load(path)
    del model.metadata_props[:]
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="not a usable"):
        Probe(path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        Probe(tmp_path / "missing.onnx")
