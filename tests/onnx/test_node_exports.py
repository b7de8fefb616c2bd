"""An onnxruntime node's exports (`<onnx_dir>/exit-<E>`): opened per served exit, refused when
missing or exported from another model than the topology names."""

from __future__ import annotations

import pytest

from ruyiflow.engine.errors import ModelLoadError, ModelMismatch
from ruyiflow.engine.ort_engine import open_ort_engine


def test_node_exports_are_checked(smol_dir, tmp_path):
    (tmp_path / "exit-12").symlink_to(smol_dir, target_is_directory=True)
    engine = open_ort_engine(tmp_path, [12], expect_model="smollm2")
    assert engine.config.served == (12,) and engine.config.exits == (12, 16, 20, 24, 29)
    with pytest.raises(ModelMismatch, match="exported from model 'smollm2'.*'/models/other'"):
        open_ort_engine(tmp_path, [12], expect_model="/models/other")
    with pytest.raises(ModelLoadError, match="no ONNX export for exit 16"):
        open_ort_engine(tmp_path, [12, 16])
