"""Training lowers the KL to the last exit; a resumed run equals an uninterrupted one; features
taken from the generation caches equal recomputed ones."""

from __future__ import annotations

import pytest
import torch

from ruyiflow.distill.corpus import build_corpus, read_prompts
from ruyiflow.distill.features import FeatureBuilder, compute_features
from ruyiflow.distill.train import Trainer, TrainSettings, batch_indices, lr_at, mean_kl
from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.errors import InvalidRequest
from tests.distill.conftest import EXITS, one_thread, run_settings


@pytest.fixture(scope="module")
def data(tiny_dir, prompts_file):
    """(loaded base model, corpus, features collected while generating)."""
    loaded = load_model(str(tiny_dir), extra_exits=list(EXITS), overlay="none")
    corpus_settings, _ = run_settings()
    builder = FeatureBuilder(loaded.model, EXITS, 32)
    with one_thread():
        prompts = read_prompts(prompts_file)
        corpus = build_corpus(loaded, prompts, corpus_settings, True, builder.add_cache)
    return loaded, corpus, builder.build(len(corpus.train))


def test_features_from_generation_equal_recomputed(data, capsys):
    loaded, corpus, features = data
    again = compute_features(loaded.model, corpus.train, EXITS, 32, quiet=False)
    bar = capsys.readouterr().err.splitlines()  # not a terminal: its start and its end
    assert len(bar) == 2 and bar[-1].startswith("features: 100% "), bar
    assert again.lengths == features.lengths and again.num_answer == features.num_answer
    assert sum(features.num_answer) == corpus.num_completion_tokens()
    for e in EXITS:
        torch.testing.assert_close(again.boundary[e], features.boundary[e], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again.teacher_logp, features.teacher_logp, rtol=1e-4, atol=1e-4)
    assert torch.equal(again.targets, features.targets)
    # the targets are the answers, and the teacher's top-k covers the greedy answer tokens
    first = corpus.train[0]
    assert features.targets[: features.num_answer[0]].tolist() == first.ids[first.num_prompt :]


def test_training_reduces_kl(data):
    loaded, _, features = data
    _, settings = run_settings(steps=20)
    trainer = Trainer(loaded.model, features, settings, "key")
    before = {e: mean_kl(loaded.model, features, e) for e in EXITS}
    for _ in range(settings.steps):
        trainer.train_step()
    after = {e: mean_kl(loaded.model, features, e, trainer.loras[e]) for e in EXITS}
    for e in EXITS:
        assert after[e] < 0.5 * before[e], (e, before[e], after[e])


def final_params(trainer):
    return {
        f"{e}.{k}": v.clone()
        for e, lora in trainer.loras.items()
        for k, v in lora.state_dict().items()
    }


def test_interrupted_then_resumed_run_equals_uninterrupted(data, tmp_path, capsys):
    loaded, _, features = data
    _, settings = run_settings(steps=7)  # checkpoints every 5 steps and at the end
    whole = Trainer(loaded.model, features, settings, "key")
    whole.run(tmp_path / "a", quiet=True)
    interrupted = Trainer(loaded.model, features, settings, "key")

    def stop_at_six(step: int) -> None:
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted.run(tmp_path / "b", quiet=True, on_step=stop_at_six)
    resumed = Trainer(loaded.model, features, settings, "key")
    assert resumed.restore(tmp_path / "b") and resumed.step == 5  # the last checkpoint
    capsys.readouterr()
    resumed.run(tmp_path / "b")
    # its bar starts where the checkpoint left off and ends with the KL per exit and the lr
    bar = capsys.readouterr().err.splitlines()
    assert len(bar) == 2 and bar[0].startswith("train:  71% 5/7 "), bar
    assert bar[-1].startswith("train: 100% 7/7 ") and all(k in bar[-1] for k in ("kl1=", "lr="))
    assert resumed.step == 7 and resumed.history == whole.history
    a, b = final_params(whole), final_params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a checkpoint of other settings is refused, not silently mixed in
    other = Trainer(loaded.model, features, run_settings(steps=9)[1], "key")
    with pytest.raises(InvalidRequest, match="other data or settings"):
        other.restore(tmp_path / "b")


def test_schedule_is_a_function_of_seed_and_step():
    assert batch_indices(10, 4, 0, 3) == batch_indices(10, 4, 0, 3)
    assert batch_indices(10, 4, 0, 3) != batch_indices(10, 4, 1, 3)
    epoch = [i for s in range(5) for i in batch_indices(10, 4, 7, s)][:10]
    assert sorted(epoch) == list(range(10))  # every sample once per epoch
    s = TrainSettings(exits=(1,), steps=100, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(1e-3) and lr_at(9, s) == pytest.approx(1e-2)
    assert lr_at(99, s) == pytest.approx(1e-3)


def test_bad_settings_refused(data):
    loaded, _, features = data
    with pytest.raises(InvalidRequest):
        TrainSettings(exits=(1,), rank=0)
    with pytest.raises(InvalidRequest, match="not shallow exits"):
        Trainer(loaded.model, features, TrainSettings(exits=(3,)), "key")
