"""Shared fixtures: the embedded model loaded once per session, and the transformers oracle."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    from ruyiflow.engine.checkpoint import load_model

    return load_model("smollm2", "float32")


@pytest.fixture(scope="session")
def smollm2_untrained():
    """SmolLM2 with its extra exits as untrained copies (no shipped overlay)."""
    from ruyiflow.engine.checkpoint import load_model

    return load_model("smollm2", "float32", overlay="none")


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own GGUF loader (dequantise + un-permute) as an independent oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    from ruyiflow.engine.checkpoint import embedded_gguf_path

    path = embedded_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` need a CUDA device: skipped, saying so, where there is none."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run by `ruyiflow bench gpu`)")
    for item in gpu:
        item.add_marker(skip)
