"""ORT vs torch on tiny random checkpoints of every dense family, every exit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.model import Branch
from ruyiflow.engine.onnx.runtime import OnnxBranch
from ruyiflow.export.onnx_export import export_branch
from tests import tiny
from tests.onnx.util import assert_cache_equal, ort_run, torch_run

IDS = [5, 17, 200, 3, 99, 250, 1, 42, 7, 300, 12]
TOL = dict(atol=1e-4, rtol=1e-4)


def check_all_exits(loaded, root, split: int | list[int] = 7) -> None:
    for e in loaded.config.exits:
        export_branch(loaded, e, root / f"exit{e}")
        branch = OnnxBranch.open(root / f"exit{e}", threads=1, expect_exit=e)
        ref, cache = torch_run(loaded, IDS, e, split)
        got, boundary, present = ort_run(branch, IDS, split)
        np.testing.assert_allclose(got, ref, **TOL, err_msg=f"exit {e}")
        assert_cache_equal(cache, present, boundary, e)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama"])
def test_plain_families_all_exits(tmp_path, family):
    tiny.save_plain(tmp_path / "model", family)
    loaded = load_model(str(tmp_path / "model"), extra_exits=[1, 2])
    check_all_exits(loaded, tmp_path)


@pytest.mark.parametrize("base", ["qwen2", "qwen3"])
def test_ruyi_native_branches_all_exits(tmp_path, base):
    tiny.save_ruyi(tmp_path / "model", base, [1, 2, 4], num_layers=5)
    loaded = load_model(str(tmp_path / "model"))
    assert loaded.config.native_branches
    check_all_exits(loaded, tmp_path, split=[4, 3, 1, 2, 1])  # chunked prefill over a past


def test_branch_weights_come_from_the_loaded_model(tmp_path):
    """An overlay (branch layer/norm replaced after loading) is what gets exported."""
    tiny.save_plain(tmp_path / "model", "llama")
    loaded = load_model(str(tmp_path / "model"), extra_exits=[1])
    old = loaded.model.branches[1]
    loaded.model.branches[1] = Branch(old.layer, old.norm * 1.7 + 0.1, old.head)
    export_branch(loaded, 1, tmp_path / "x")
    got, _, _ = ort_run(OnnxBranch.open(tmp_path / "x", threads=1), IDS, 6)
    ref, _ = torch_run(loaded, IDS, 1, 6)
    np.testing.assert_allclose(got, ref, **TOL)
    loaded.model.branches[1] = old
    base, _ = torch_run(loaded, IDS, 1, 6)
    assert np.abs(got - base).max() > 1e-2


def test_padded_batch_rows_equal_each_row_alone(tmp_path):
    """Left-padded prefill of two lengths, then decode steps: each row as if alone."""
    tiny.save_plain(tmp_path / "model", "qwen3")
    loaded = load_model(str(tmp_path / "model"))
    export_branch(loaded, 3, tmp_path / "x")
    branch = OnnxBranch.open(tmp_path / "x", threads=1)
    rows = [[5, 17, 200, 3], [9, 8, 7, 6, 5, 4, 3]]
    steps = [[11, 12], [21, 22]]  # two decode tokens per row
    width = max(map(len, rows))
    ids = np.zeros((2, width), np.int64)
    pos = np.zeros((2, width), np.int64)
    mask = np.zeros((2, width), np.int64)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = row
        pos[r, width - len(row) :] = np.arange(len(row))
        mask[r, width - len(row) :] = 1
    logits, boundary, past = branch.run(ids, pos, mask, branch.empty_past(2))
    got = [logits]
    for k in range(2):
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        step_pos = np.array([[len(rows[0]) + k], [len(rows[1]) + k]])
        step_ids = np.array([[steps[0][k]], [steps[1][k]]])
        logits, _, past = branch.run(step_ids, step_pos, mask, past)
        got.append(logits)
    for r, row in enumerate(rows):
        alone, _, _ = ort_run(branch, row + steps[r], len(row))
        np.testing.assert_allclose(np.stack([g[r] for g in got]), alone, **TOL)
        ref, _ = torch_run(loaded, row + steps[r], 3, len(row))
        np.testing.assert_allclose(alone, ref, **TOL)
    assert boundary.shape == (2, width, loaded.config.hidden_size)
    assert np.isfinite(boundary).all()  # fully padded rows stay finite


def test_right_padded_past_of_separately_prefilled_rows(tmp_path):
    """Two sequences prefilled alone, joined in one decode batch with the shorter one's past
    padded on the right (what a batching engine does when a request joins)."""
    tiny.save_plain(tmp_path / "model", "qwen2")
    loaded = load_model(str(tmp_path / "model"))
    export_branch(loaded, 3, tmp_path / "x")
    branch = OnnxBranch.open(tmp_path / "x", threads=1)
    a, b = [5, 17, 200], [9, 8, 7, 6, 5, 4]
    _, _, past_a = ort_run(branch, a, len(a))
    _, _, past_b = ort_run(branch, b, len(b))
    pad = len(b) - len(a)
    past = []
    for (ka, va), (kb, vb) in zip(past_a, past_b, strict=True):
        widen = ((0, 0), (0, 0), (0, pad), (0, 0))
        past.append(
            (np.concatenate([np.pad(ka, widen), kb]), np.concatenate([np.pad(va, widen), vb]))
        )
    mask = np.array([[1] * len(a) + [0] * pad + [1], [1] * (len(b) + 1)])
    logits, _, present = branch.run(
        np.array([[33], [44]]), np.array([[len(a)], [len(b)]]), mask, past
    )
    alone_a, _ = torch_run(loaded, a + [33], 3, len(a))
    alone_b, _ = torch_run(loaded, b + [44], 3, len(b))
    np.testing.assert_allclose(logits[0], alone_a[-1], **TOL)
    np.testing.assert_allclose(logits[1], alone_b[-1], **TOL)
    assert present[0][0].shape == (
        2,
        loaded.config.num_kv_heads,
        len(b) + 1,
        loaded.config.head_dim,
    )


def test_rope_scaling_llama3(tmp_path):
    """llama3 RoPE scaling: the exported cos/sin tables follow the model's RopeTable."""
    model = tiny.hf_model(
        "llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    model.save_pretrained(tmp_path / "model")
    tiny.tiny_tokenizer(tmp_path / "model")
    loaded = load_model(str(tmp_path / "model"))
    assert loaded.config.rope.rope_type == "llama3"
    export_branch(loaded, 3, tmp_path / "x")
    ids = IDS * 12  # positions past original_max_position_embeddings
    got, _, _ = ort_run(OnnxBranch.open(tmp_path / "x", threads=1), ids, len(ids) - 2)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -3:].numpy()
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-4)
