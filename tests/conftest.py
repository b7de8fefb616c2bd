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
    """transformers' LlamaForCausalLM on the embedded GGUF's weights as an independent oracle:
    config by transformers' GGUF key mapping, values by `gguf.quants`, names by gguf's tensor map
    and Q/K rows un-permuted by transformers' GGUF tensor processor -- none of our loader's code
    but the byte reader (equal to gguf's, tests/engine/test_gguf_file.py). The same as
    `from_pretrained(gguf_file=...)`, which takes ~15 s more to parse the file twice."""
    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from ruyiflow.engine.checkpoint import embedded_gguf_path
    from ruyiflow.engine.loaders.gguf_file import GGUFFile

    file = GGUFFile(embedded_gguf_path())
    tensors = {t.name: t for t in file.tensors}
    fields = {"vocab_size": len(file.metadata["tokenizer.ggml.tokens"])}
    for key, name in GGUF_CONFIG_MAPPING["llama"].items():
        if f"llama.{key}" in file.metadata:
            fields[name] = file.metadata[f"llama.{key}"]
    fields["tie_word_embeddings"] = "output.weight" not in tensors
    config = LlamaConfig(**fields)
    model = LlamaForCausalLM(config).eval()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    processor = LlamaTensorProcessor(config=fields)
    state = {}
    for key in model.state_dict():
        base, _, suffix = key.rpartition(".")
        t = tensors.get(f"{names.get_name(base)}.{suffix}")
        if t is None:
            continue  # the tied head: checked below
        values = dequantize(t.rows(), t.tensor_type).reshape(tuple(reversed(t.shape)))
        values = processor.process(weights=values, name=t.name).weights
        state[key] = torch.from_numpy(np.array(values, dtype=np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if config.tie_word_embeddings else [])
    model.tie_weights()
    assert len(state) == len(tensors)  # every tensor of the file is in the model
    return model


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
