"""Shared exports: SmolLM2 exit 12 in float32, int8 and int4, written once per test session."""

from __future__ import annotations

import pytest

from ruyiflow.export.onnx_export import export_branch


@pytest.fixture(scope="session")
def smol_dir(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "smollm2-e12"
    export_branch(smollm2, 12, out)
    return out


@pytest.fixture(scope="session")
def smol_quant_dirs(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-quant")
    dirs = {}
    for quant in ("int8", "int4"):
        dirs[quant] = root / f"smollm2-e12-{quant}"
        export_branch(smollm2, 12, dirs[quant], quant=quant)
    return dirs
