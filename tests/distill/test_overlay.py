"""Overlay files: a load round trip reproduces the trained branches, leaves the trunk and every
other exit alone, is refused for other weights, and changes the model fingerprint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ruyiflow.distill.branch import BranchWeights, branch_forward
from ruyiflow.distill.corpus import Sample
from ruyiflow.distill.features import boundary_states
from ruyiflow.distill.overlay import save_overlay
from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.errors import ModelLoadError, ModelMismatch
from ruyiflow.engine.model import Work
from ruyiflow.engine.overlay import FORMAT, read_overlay
from ruyiflow.engine.sampling import SamplingParams
from tests.distill.conftest import EXITS

IDS = [1, 45, 200, 7, 19, 88, 3, 150, 61, 12]


def logits(loaded, exit_layer, ids=IDS):
    m = loaded.model
    return m.forward([Work(m.new_cache(), ids, 0, exit_layer)])[0]


def test_round_trip_equals_trained_branches(tiny_run, tiny_dir):
    result, out = tiny_run
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    base = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay="none")
    trained = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay=result.overlay)
    assert trained.overlay == str(result.overlay)
    # the trained deltas, run unmerged through the training forward, give the loaded logits
    from ruyiflow.distill.branch import LoraBranch

    h = boundary_states(base.model, [Sample(IDS + [0], 1)])[0]
    for e in EXITS:
        gen = torch.Generator().manual_seed(0)
        lora = LoraBranch(base.model.branches[e], base.model.geo, 4, 8.0, gen)
        lora.load_state_dict(state["loras"][str(e)])
        with torch.no_grad():
            normed = branch_forward(
                BranchWeights(base.model.branches[e], lora),
                h[e],
                [len(IDS)],
                base.model.geo,
                base.model.rope,
            )
        want = normed[-1] @ base.model.branches[e].head.T
        torch.testing.assert_close(logits(trained, e), want, rtol=1e-4, atol=1e-4)
        assert (logits(trained, e) - logits(base, e)).abs().max() > 1e-3  # it did change


def test_overlay_leaves_trunk_and_last_exit_untouched(tiny_run, tiny_dir):
    result, _ = tiny_run
    base = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay="none")
    trained = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay=result.overlay)
    for a, b in zip(base.model.layers, trained.model.layers, strict=True):
        for ta, tb in zip(a.tensors(), b.tensors(), strict=True):
            assert torch.equal(ta, tb)
    # layers[1] is both exit 1's untrained branch layer and a trunk layer of exits 2 and 3
    assert trained.model.branches[1].layer is not trained.model.layers[1]
    assert torch.equal(logits(base, 3), logits(trained, 3))


def test_overlay_of_one_exit_leaves_deeper_exits(tiny_run, tiny_dir, tmp_path):
    result, _ = tiny_run
    full = read_overlay(result.overlay)
    only_one = {k: v for k, v in full.tensors.items() if k.startswith("exit.1.")}
    meta = type(full.meta)(full.meta.base_fingerprint, (1,), full.meta.rank, full.meta.scale)
    path = tmp_path / "one.safetensors"
    save_overlay(path, meta, only_one, torch.float32)
    base = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay="none")
    one = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay=path)
    both = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay=result.overlay)
    torch.testing.assert_close(logits(one, 1), logits(both, 1))
    assert torch.equal(logits(one, 2), logits(base, 2))
    assert torch.equal(logits(one, 3), logits(base, 3))


def test_foreign_overlay_refused(tiny_run, tiny_dir, tmp_path):
    from tests.tiny import save_plain

    result, _ = tiny_run
    other = tmp_path / "other"
    other.mkdir()
    save_plain(other, "llama", num_layers=4, seed=1)  # same shapes, other weights
    with pytest.raises(ModelMismatch, match="trained on base model"):
        load_model(str(other), extra_exits=list(EXITS), overlay=result.overlay)
    with pytest.raises(ModelMismatch):  # same weights, other exits: another base model
        load_model(str(tiny_dir), extra_exits=[1], overlay=result.overlay)


def test_malformed_overlays_refused(tiny_run, tiny_dir, tmp_path):
    result, _ = tiny_run
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="unreadable"):
        read_overlay(junk)
    with pytest.raises(ModelLoadError, match="not found"):
        read_overlay(tmp_path / "missing.safetensors")
    full = read_overlay(result.overlay)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelLoadError, match="not a ruyiflow exit overlay"):
        read_overlay(plain)
    newer = tmp_path / "newer.safetensors"
    save_file(full.tensors, str(newer), {**full.meta.to_metadata(), "format_version": "99"})
    with pytest.raises(ModelLoadError, match="version"):
        read_overlay(newer)
    nan = dict(full.tensors)
    nan["exit.1.norm.weight"] = torch.full_like(nan["exit.1.norm.weight"], float("nan"))
    bad = tmp_path / "nan.safetensors"
    save_file(nan, str(bad), full.meta.to_metadata())
    with pytest.raises(ModelLoadError, match="non-finite"):
        read_overlay(bad)
    short = {k: v for k, v in full.tensors.items() if "q_proj.lora_A" not in k}
    save_file(short, str(bad), full.meta.to_metadata())
    with pytest.raises(ModelLoadError, match="missing tensor"):
        read_overlay(bad)
    wrong = dict(full.tensors)
    wrong["exit.1.q_proj.lora_A"] = torch.zeros(3, 64)
    save_file(wrong, str(bad), full.meta.to_metadata())
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(str(tiny_dir), extra_exits=list(EXITS), overlay=bad)
    assert json.loads(full.meta.to_metadata()["exits"]) == list(EXITS)
    assert full.meta.to_metadata()["format"] == FORMAT


def test_fingerprint_covers_the_overlay(tiny_run, tiny_dir, tmp_path):
    result, _ = tiny_run
    base = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay="none")
    a = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay=result.overlay)
    again = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay=result.overlay)
    full = read_overlay(result.overlay)
    nudged = dict(full.tensors)
    nudged["exit.2.norm.weight"] = nudged["exit.2.norm.weight"] * 1.001
    path = tmp_path / "nudged.safetensors"
    save_overlay(path, full.meta, nudged, torch.float32)
    b = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay=path)
    assert len({base.fingerprint, a.fingerprint, b.fingerprint}) == 3
    assert again.fingerprint == a.fingerprint
    # so a hidden-state handoff between nodes with different overlays is refused
    src = Engine(a)
    seq = src.add_request(IDS, SamplingParams(max_tokens=4), exit_layer=2)
    src.step()
    data = src.export_state(seq, "hidden")
    with pytest.raises(ModelMismatch):
        Engine(base).import_state(data)
    Engine(again).import_state(data)  # same overlay: accepted
