"""`ruyiflow generate --backend onnxruntime --onnx DIR`: same options and `--json` output as the
torch backend, the same greedy tokens, and it runs with torch made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ruyiflow.cli import main
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling_params import SamplingParams

PROMPT = "What is the capital of France?"
NO_TORCH = "import sys; sys.modules['torch'] = None; from ruyiflow.cli import main; main()"


def torch_tokens(smollm2, n: int) -> list[int]:
    tok = smollm2.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    return [e.token_id for e in Engine(smollm2).generate(ids, SamplingParams(max_tokens=n), 12)]


def test_json_output_matches_the_torch_engine(smol_dir, smollm2, capsys):
    argv = ["generate", "--backend", "onnxruntime", "--onnx", str(smol_dir), "--json"]
    assert main([*argv, "--max-tokens", "12", PROMPT]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["exit"] == 12 and out["fingerprint"] == smollm2.fingerprint
    assert out["token_ids"] == torch_tokens(smollm2, 12)
    assert {"text", "finish_reason", "confidence", "decode_tokens_per_s"} <= set(out)


def test_runs_without_torch(smol_dir, smollm2):
    argv = ["generate", "--backend", "onnxruntime", "--onnx", str(smol_dir), "--json"]
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv, "--max-tokens", "6", PROMPT],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["token_ids"] == torch_tokens(smollm2, 6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "onnxruntime"], "needs --onnx DIR"),
        (["--onnx", "somewhere"], "need --backend onnxruntime"),
        (["--backend", "onnxruntime", "--onnx", "/no/such/export"], "no such export directory"),
        (["--backend", "onnxruntime", "--onnx", "SMOL", "--exit", "16"], "not served"),
    ],
)
def test_bad_options(smol_dir, extra, message, capsys):
    extra = [str(smol_dir) if x == "SMOL" else x for x in extra]
    assert main(["generate", *extra, PROMPT]) == 2
    assert message in capsys.readouterr().err
