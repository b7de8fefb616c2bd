"""`ruyiflow convert-branch`: a branch written as a plain Hugging Face checkpoint, loaded with
transformers, gives our branch's logits - tiny Ruyi checkpoints (Qwen2 and Qwen3 trunks,
shallow and last exits) and the embedded SmolLM2 family (GGUF, trained exit overlay)."""

from __future__ import annotations

import json

import pytest
import torch

from ruyiflow.cli import main
from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.model import Work
from ruyiflow.export.convert_branch import convert_branch
from tests import tiny

TOL = dict(atol=2e-4, rtol=1e-4)


def our_logits(loaded, ids: list[int], exit_layer: int) -> torch.Tensor:
    """Logits of every position at `exit_layer`: prefill, then one decode step per token."""
    model, cache = loaded.model, loaded.model.new_cache()
    out = [model.forward([Work(cache, ids[:1], 0, exit_layer)])[0]]
    for pos in range(1, len(ids)):
        out.append(model.forward([Work(cache, [ids[pos]], pos, exit_layer)])[0])
    return torch.stack(out)


def hf_logits(path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("base", ["qwen2", "qwen3"])
@pytest.mark.parametrize("exit_layer", [1, 4])
def test_ruyi_branch_loads_in_transformers_with_our_logits(tmp_path, base, exit_layer):
    tiny.save_ruyi(tmp_path / "ruyi", base, [1, 2, 4], num_layers=5)
    out = convert_branch(str(tmp_path / "ruyi"), exit_layer, tmp_path / "plain")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == base and config["num_hidden_layers"] == exit_layer + 1
    assert "early_exit_points" not in config
    ids = [9, 8, 250, 31, 77, 2, 140, 66, 5]
    ours = our_logits(load_model(str(tmp_path / "ruyi")), ids, exit_layer)
    torch.testing.assert_close(hf_logits(out, ids), ours, **TOL)


def test_smollm2_trained_exit_via_the_command(tmp_path, capsys):
    from transformers import AutoTokenizer

    assert main(["convert-branch", "--exit", "16", "--out", str(tmp_path / "e16")]) == 0
    assert "wrote exit 16" in capsys.readouterr().out
    loaded = load_model("smollm2")  # with the shipped overlay: the trained exit 16
    text = "The capital of France is"
    ids = loaded.tokenizer.encode(text)
    torch.testing.assert_close(hf_logits(tmp_path / "e16", ids), our_logits(loaded, ids, 16), **TOL)
    hf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "e16")
    assert hf_tokenizer(text)["input_ids"] == ids
    messages = [{"role": "user", "content": "Hi!"}]
    assert hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == (loaded.tokenizer.apply_chat_template(messages))


def test_an_exit_the_model_lacks_is_refused(tmp_path):
    tiny.save_ruyi(tmp_path / "ruyi", "qwen2", [1, 2, 4], num_layers=5)
    assert main(["convert-branch", "--model", str(tmp_path / "ruyi"), "--exit", "3",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
