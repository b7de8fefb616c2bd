"""Loading onto a device: one clear error for a device this process cannot use, the lazy
safetensors reader (validation, fingerprints unchanged), and no second host copy of the weights
while loading (peak RSS measured in a fresh process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.device import check_device_name, resolve_device
from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.engine.fingerprint import fingerprint
from ruyiflow.engine.loaders.safetensors_loader import SafetensorsCheckpoint
from tests import tiny

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def test_device_names() -> None:
    for name in ("cpu", "cuda", "cuda:1"):
        assert check_device_name(name) == name
    for name in ("gpu", "cuda:x", "CUDA", "cpu:0 "):
        with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
            check_device_name(name)
    assert resolve_device("cpu") == torch.device("cpu")


@no_cuda
def test_cuda_without_cuda_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="device 'cuda:1' asked, but .*use --device cpu"):
        resolve_device("cuda:1")
    tiny.save_plain(tmp_path, "qwen2")
    with pytest.raises(ModelLoadError, match="device 'cuda' asked"):
        load_model(str(tmp_path), device="cuda")
    cli = [sys.executable, "-m", "ruyiflow", "generate", "--model", str(tmp_path)]
    result = subprocess.run(
        [*cli, "--device", "cuda", "--prompt-ids", "1,2,3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "device 'cuda' asked" in lines[0], result.stderr


def test_lazy_reader_keeps_fingerprints_and_values(tmp_path) -> None:
    model = tiny.save_plain(tmp_path, "qwen3")
    checkpoint = SafetensorsCheckpoint(tmp_path)
    state = model.state_dict()
    assert set(checkpoint) == set(state)
    for key, value in state.items():
        assert checkpoint.shape(key) == tuple(value.shape)
        assert torch.equal(checkpoint[key], value)
    loaded = load_model(str(tmp_path))
    assert loaded.fingerprint == fingerprint(loaded.config, dict(checkpoint))


def test_corrupt_safetensors_is_refused(tmp_path) -> None:
    tiny.save_plain(tmp_path, "qwen2")
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])  # truncated: the last tensor's bytes run past
    with pytest.raises(ModelLoadError, match="do not match its shape|cannot read safetensors"):
        load_model(str(tmp_path))
    file.write_bytes(b"\xff" * 8 + data[8:])  # header length beyond the file
    with pytest.raises(ModelLoadError, match="header length"):
        load_model(str(tmp_path))


RSS_SCRIPT = """
import json, sys
from ruyiflow.engine.checkpoint import load_model

def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

load_model(sys.argv[3], sys.argv[2])  # a small model first: imports and caches paid up front
base = status('VmRSS:')
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
loaded = load_model(sys.argv[1], sys.argv[2])
print(json.dumps({"peak": status("VmHWM:") - base}))
"""


def test_peak_host_memory_while_loading_is_about_the_model(tmp_path) -> None:
    """A float32 checkpoint of 119 MiB loaded as float32 on the CPU: the process grows by about
    the model's size (1.17x measured), not model + checkpoint."""
    from safetensors.torch import save_file

    config = tiny.hf_config(
        "qwen2", num_layers=6, vocab_size=12000, hidden_size=512, intermediate_size=1536
    )
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=gen) * 0.02 for k, s in _shapes(config).items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    tiny.tiny_tokenizer(tmp_path)
    size = sum(t.numel() * 4 for t in state.values())
    del state
    tiny.save_plain(tmp_path / "small", "qwen2")
    result = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path), "float32", str(tmp_path / "small")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    peak = json.loads(result.stdout.strip().splitlines()[-1])["peak"]
    print(f"peak host RSS while loading: {peak / size:.2f}x the checkpoint ({size >> 20} MiB)")
    assert peak < 1.3 * size, f"peak RSS while loading {peak / size:.2f}x the checkpoint"


def _shapes(config) -> dict[str, torch.Size]:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: v.shape for k, v in model.state_dict().items()}
