"""Bad input is refused with an error that names the cause."""

from __future__ import annotations

import json

import pytest
import torch

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.errors import HandoffError, InvalidRequest, ModelLoadError, ModelMismatch
from ruyiflow.engine.sampling import SamplingParams
from tests import tiny

PROMPT = [1, 504, 3458, 282, 4649]


def test_missing_model_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model(str(tmp_path / "nope"))


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_model(str(tmp_path))
    tiny.save_plain(tmp_path, "qwen2")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(str(tmp_path))


def test_corrupt_weights(tmp_path):
    tiny.save_plain(tmp_path, "qwen2")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        load_model(str(tmp_path))


def test_corrupt_config_and_unknown_family(tmp_path):
    tiny.save_plain(tmp_path, "qwen2")
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="unknown family"):
        load_model(str(tmp_path))


def test_missing_and_misshapen_tensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "m"
    tiny.save_plain(model_dir, "qwen2")
    tensors = load_file(str(model_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(str(model_dir))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="has shape"):
        load_model(str(model_dir))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(str(bad))


def test_bad_extra_exits_and_dtype(tmp_path):
    with pytest.raises(ModelLoadError, match="out of range"):
        load_model("smollm2", extra_exits=[3, 40])
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("smollm2", dtype="int8")


def test_request_errors(smollm2):
    engine = Engine(smollm2, max_context=64)
    with pytest.raises(InvalidRequest, match="exit 13 is not an exit"):
        engine.add_request(PROMPT, exit_layer=13)
    with pytest.raises(InvalidRequest, match="exceeds the context length 64"):
        engine.add_request(list(range(100)))
    with pytest.raises(InvalidRequest, match="empty"):
        engine.add_request([])
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.add_request([1, 10**9])
    with pytest.raises(InvalidRequest, match="top_p"):
        SamplingParams(top_p=0.0)


@pytest.fixture(scope="module")
def state(smollm2):
    engine = Engine(smollm2)
    sid = engine.add_request(PROMPT, SamplingParams(max_tokens=20, ignore_eos=True), 12)
    for _ in range(3):
        engine.step()
    return engine.export_state(sid, "hidden")


def _rewrite(state: bytes, meta_edit=None, tensor_edit=None) -> bytes:
    from safetensors.torch import load, save

    header_len = int.from_bytes(state[:8], "little")
    meta = json.loads(json.loads(state[8 : 8 + header_len])["__metadata__"]["ruyiflow"])
    tensors = load(state)
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    return save(tensors, metadata={"ruyiflow": json.dumps(meta)})


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda s: s[: len(s) // 2], HandoffError, "not a valid payload"),
        (lambda s: b"garbage", HandoffError, "not a valid payload"),
        (
            lambda s: _rewrite(s, lambda m: m.update(fingerprint="0" * 24)),
            ModelMismatch,
            "only tokens mode",
        ),
        (lambda s: _rewrite(s, lambda m: m.update(exit=13)), HandoffError, "exit 13"),
        (lambda s: _rewrite(s, lambda m: m.update(version=9)), HandoffError, "version 9"),
        (lambda s: _rewrite(s, lambda m: m["token_ids"].append(10**9)), HandoffError, "vocabulary"),
        (lambda s: _rewrite(s, lambda m: m.pop("params")), HandoffError, "'params' missing"),
        (lambda s: _rewrite(s, lambda m: m["params"].update(top_p=5)), InvalidRequest, "top_p"),
        (
            lambda s: _rewrite(s, tensor_edit=lambda t: t.pop("trunk.3.v")),
            HandoffError,
            "trunk.3.v",
        ),
        (
            lambda s: _rewrite(s, tensor_edit=lambda t: t.update({"boundary": t["boundary"][:-1]})),
            HandoffError,
            "shape",
        ),
        (
            lambda s: _rewrite(
                s, tensor_edit=lambda t: t.update({"trunk.0.k": t["trunk.0.k"].half()})
            ),
            HandoffError,
            "dtype",
        ),
        (
            lambda s: _rewrite(
                s, tensor_edit=lambda t: t["boundary"].__setitem__((0, 0), float("nan"))
            ),
            HandoffError,
            "non-finite",
        ),
        (
            lambda s: _rewrite(s, tensor_edit=lambda t: t.update({"rng": t["rng"][:10]})),
            HandoffError,
            "rng",
        ),
    ],
)
def test_tampered_state_is_refused(smollm2, state, edit, error, match):
    engine = Engine(smollm2)
    with pytest.raises(error, match=match):
        engine.import_state(edit(state))
    assert not engine.has_work()


def test_hidden_state_cannot_resume_shallower(smollm2):
    engine = Engine(smollm2)
    sid = engine.add_request(PROMPT, SamplingParams(max_tokens=20, ignore_eos=True), 16)
    engine.step()
    data = engine.export_state(sid, "hidden")
    with pytest.raises(HandoffError, match="that exit or deeper"):
        Engine(smollm2).import_state(data, exit_layer=12)
    Engine(smollm2).import_state(data, exit_layer=20)  # deeper is fine
