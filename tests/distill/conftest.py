"""Shared tiny-model fixtures: one random 4-layer llama checkpoint served with exits (1, 2, 3)
and one short distillation run on it, reused by the overlay tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

EXITS = (1, 2)
PROMPTS = [
    "Hello there!",
    "What is two plus two?",
    "Name a colour.",
    "Write a word.",
    "Count to three.",
    "Say yes or no.",
    "Tell me a joke.",
    "What is the sky?",
]


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run thousands of small ops; on a shared 2-core machine a second thread costs
    more in synchronisation than it brings (measured 5x slower training)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tests.tiny import save_plain

    path = tmp_path_factory.mktemp("tiny-llama")
    save_plain(path, "llama", num_layers=4, seed=0)
    return path


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# tiny prompts\n" + "\n".join(PROMPTS) + "\n")
    return path


def run_settings(steps: int = 20, seed: int = 0):
    from ruyiflow.distill.corpus import CorpusSettings
    from ruyiflow.distill.train import TrainSettings

    corpus = CorpusSettings(tokens=400, max_new_tokens=16, seed=0, max_batch=8)
    train = TrainSettings(
        exits=EXITS,
        rank=4,
        alpha=8.0,
        steps=steps,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        seed=seed,
        checkpoint_every=5,
    )
    return corpus, train


@pytest.fixture(scope="session")
def tiny_run(tiny_dir, prompts_file, tmp_path_factory):
    """A finished distillation of the tiny model: (result, out dir)."""
    import torch

    from ruyiflow.distill.pipeline import distill

    out = tmp_path_factory.mktemp("distill-out")
    corpus, train = run_settings()
    with one_thread():
        result = distill(
            str(tiny_dir),
            EXITS,
            out,
            corpus,
            train,
            top_k=32,
            prompts_file=prompts_file,
            quiet=True,
            overlay_dtype=torch.float32,
        )
    return result, out
