"""Refusals (stale, foreign, malformed exports; bad inputs), the torch-free runtime, the
tokenizer written beside the graph, quantized weights equal onnxruntime's quantizers, the CLI."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ruyiflow import cmd_export_onnx
from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.errors import InvalidRequest, ModelLoadError, ModelMismatch
from ruyiflow.engine.onnx.manifest import MANIFEST_FILE
from ruyiflow.engine.onnx.runtime import OnnxBranch
from ruyiflow.engine.tokenizer import Tokenizer
from ruyiflow.export.onnx_export import export_branch, write_model
from ruyiflow.export.onnx_graph import build_branch_graph
from tests import tiny
from tests.onnx.util import ort_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny.save_ruyi(path, "qwen2", [1, 3], num_layers=4)
    return load_model(str(path))


@pytest.fixture(scope="module")
def tiny_export(tiny_loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-export") / "exit1"
    export_branch(tiny_loaded, 1, out)
    return out


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_edited_weights_are_refused_as_stale(tiny_export, tmp_path):
    path = copy_of(tiny_export, tmp_path)
    data = path / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte changed
    data.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match=r"stale/corrupt export.*model.onnx.data.*sha256"):
        OnnxBranch.open(path)


def test_missing_or_truncated_files_are_refused(tiny_export, tmp_path):
    path = copy_of(tiny_export, tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json is missing"):
        OnnxBranch.open(path)
    shutil.copy(tiny_export / "tokenizer.json", path)
    with (path / "model.onnx").open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelLoadError, match="model.onnx has .* bytes"):
        OnnxBranch.open(path)
    (path / MANIFEST_FILE).unlink()
    with pytest.raises(ModelLoadError, match="not an ONNX branch export"):
        OnnxBranch.open(path)


def test_foreign_export_is_refused_with_both_values(tiny_export, tiny_loaded):
    fp = tiny_loaded.fingerprint
    with pytest.raises(ModelMismatch, match=f"another model/exit.*{fp}.*expected 0123abcd"):
        OnnxBranch.open(tiny_export, expect_fingerprint="0123abcd")
    with pytest.raises(ModelMismatch, match="another model/exit: exit 1 .* expected 3"):
        OnnxBranch.open(tiny_export, expect_fingerprint=fp, expect_exit=3)
    assert OnnxBranch.open(tiny_export, expect_fingerprint=fp, expect_exit=1).exit == 1


def test_other_format_version_is_refused(tiny_export, tmp_path):
    path = copy_of(tiny_export, tmp_path)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    manifest["format_version"] = 99
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match="format version 99 unsupported"):
        OnnxBranch.open(path)


def test_bad_inputs_are_refused(tiny_export):
    branch = OnnxBranch.open(tiny_export, threads=1)
    ids, pos, mask = np.array([[1, 2]]), np.array([[0, 1]]), np.ones((1, 2), np.int64)
    past = branch.empty_past(1)
    with pytest.raises(InvalidRequest, match="vocabulary"):
        branch.run(np.array([[1, branch.vocab_size]]), pos, mask, past)
    with pytest.raises(InvalidRequest, match="max_context"):
        branch.run(ids, np.array([[0, branch.max_context]]), mask, past)
    with pytest.raises(InvalidRequest, match="attention_mask has shape"):
        branch.run(ids, pos, np.ones((1, 3), np.int64), past)
    with pytest.raises(InvalidRequest, match="past has 1 layers"):
        branch.run(ids, pos, mask, past[:1])
    with pytest.raises(InvalidRequest, match=r"past\[1\] value has shape"):
        bad = [*past[:1], (past[1][0], np.zeros((1, 2, 3, branch.head_dim), np.float32))]
        branch.run(ids, pos, mask, bad)
    with pytest.raises(InvalidRequest, match="integers"):
        branch.run(ids.astype(np.float32), pos, mask, past)
    with pytest.raises(InvalidRequest, match="position_ids"):
        branch.run(ids, pos[:, :1], mask, past)


def test_export_refuses_bad_requests(tiny_loaded, tmp_path):
    with pytest.raises(InvalidRequest, match="not an exit"):
        export_branch(tiny_loaded, 2, tmp_path / "a")
    with pytest.raises(InvalidRequest, match="quant"):
        export_branch(tiny_loaded, 1, tmp_path / "b", quant="int3")
    export_branch(tiny_loaded, 3, tmp_path / "d")
    export_branch(tiny_loaded, 1, tmp_path / "d")  # a previous export is overwritten
    assert OnnxBranch.open(tmp_path / "d", expect_exit=1).num_kv_layers == 2
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidRequest, match="holds files an export does not write.*notes.txt"):
        export_branch(tiny_loaded, 1, tmp_path / "c")


def test_runtime_imports_and_runs_without_torch(tiny_export):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from ruyiflow.engine.onnx.runtime import OnnxBranch\n"
        f"b = OnnxBranch.open({str(tiny_export)!r})\n"
        "lg, bd, past = b.run(np.array([[3, 4]]), np.array([[0, 1]]), np.ones((1, 2), 'int64'),"
        " b.empty_past(1))\n"
        "tok = b.load_tokenizer()\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n"
        "print(lg.shape, len(past), tok.eos_token_ids)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("(1, 320) 2")


def test_tokenizer_round_trips(smollm2, smol_dir):
    ours, theirs = Tokenizer.from_dir(smol_dir), smollm2.tokenizer
    messages = [{"role": "user", "content": "Hi there 123, ça va? 日本"}]
    text = theirs.apply_chat_template(messages)
    assert ours.apply_chat_template(messages) == text
    assert ours.encode(text) == theirs.encode(text)
    assert ours.encode("x", add_special_tokens=True) == theirs.encode("x", add_special_tokens=True)
    assert ours.eos_token_ids == theirs.eos_token_ids
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.special_tokens == theirs.special_tokens


def test_manifest_records_identity_and_facts(smollm2, smol_dir):
    manifest = json.loads((smol_dir / MANIFEST_FILE).read_text())
    assert manifest["fingerprint"] == smollm2.fingerprint
    assert manifest["exit"] == 12 and manifest["exits"] == [12, 16, 20, 24, 29]
    facts = manifest["facts"]
    assert (facts["num_trunk_layers"], facts["num_kv_heads"], facts["head_dim"]) == (12, 3, 64)
    assert facts["max_context"] == 8192 and facts["dtype"] == "float32"
    assert set(facts["eos_token_ids"]) == set(smollm2.tokenizer.eos_token_ids)
    assert manifest["onnxruntime_version"] == ort.__version__ and manifest["opset"] == 23
    assert {"model.onnx", "model.onnx.data", "tokenizer.json"} <= set(manifest["files"])
    graph = onnx.load(str(smol_dir / "model.onnx"), load_external_data=False)
    names = [i.name for i in graph.graph.input]
    assert names[:3] == ["input_ids", "position_ids", "attention_mask"]
    assert names[3:5] == ["past.0.key", "past.0.value"] and names[-1] == "past.12.value"
    assert [o.name for o in graph.graph.output][:2] == ["logits", "boundary"]


def quantized_by_onnxruntime(float_dir: Path, quant: str, out: Path) -> Path:
    """The reference: onnxruntime.quantization's own MatMulNBits quantizer on our float32 graph."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out.mkdir()
    q = MatMulNBitsQuantizer(
        onnx.load(str(float_dir / "model.onnx")),
        bits={"int8": 8, "int4": 4}[quant],
        block_size=32,
        is_symmetric=True,
        accuracy_level=4,
        op_types_to_quantize=("MatMul",),
    )
    q.process()
    q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    return out / "model.onnx"


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_weights_equal_onnxruntime_quantizers(tiny_loaded, tmp_path, quant):
    """Streamed quantization writes what onnxruntime.quantization would, bit for bit."""
    float_graph = build_branch_graph(tiny_loaded.model, 3, 512, separate_head=True)
    (tmp_path / "f32").mkdir()
    write_model(float_graph, tmp_path / "f32", lambda fraction: None)  # head as a MatMul
    export_branch(tiny_loaded, 3, tmp_path / quant, quant=quant)
    ref_path = quantized_by_onnxruntime(tmp_path / "f32", quant, tmp_path / "ref")
    ref = {
        t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(ref_path)).graph.initializer
    }
    ours = onnx.load(str(tmp_path / quant / "model.onnx"))
    quantized = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in ours.graph.initializer
        if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    }
    assert len(quantized) >= 8
    for name, array in quantized.items():
        np.testing.assert_array_equal(array, ref[name], err_msg=name)
    session = ort.InferenceSession(str(ref_path))
    branch = OnnxBranch.open(tmp_path / quant, threads=1)
    ids = [5, 17, 200, 3, 99]
    feeds = {"input_ids": np.array([ids]), "position_ids": np.arange(5)[None]}
    feeds["attention_mask"] = np.ones((1, 5), np.int64)
    for i, (k, v) in enumerate(branch.empty_past(1)):
        feeds[f"past.{i}.key"], feeds[f"past.{i}.value"] = k, v
    got, _, _ = ort_run(branch, ids, 5)
    np.testing.assert_allclose(got[0], session.run(["logits"], feeds)[0][0], atol=1e-5)


def test_cli_writes_a_loadable_export(tiny_loaded, tmp_path, capsys):
    model_dir = tmp_path / "model"
    tiny.save_plain(model_dir, "llama")
    parser = argparse.ArgumentParser()
    cmd_export_onnx.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(model_dir),
            "--exit",
            "1",
            "--extra-exits",
            "1",
            "--out",
            str(tmp_path / "x"),
            "--quant",
            "int4",
        ]
    )
    assert cmd_export_onnx.run(args) == 0
    out, err = capsys.readouterr()
    assert "100%" in err and "exported" in out and "model.onnx.data" in out
    branch = OnnxBranch.open(tmp_path / "x", expect_exit=1)
    assert branch.quant == "int4" and branch.exits == (1, 3)
    logits, _, _ = ort_run(branch, [5, 6, 7], 3)
    assert logits.shape == (1, tiny.VOCAB) and np.isfinite(logits).all()
