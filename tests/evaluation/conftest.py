"""A tiny Ruyi checkpoint (exits 1, 2, 4 of 5 layers) and a small prompt file for runner tests."""

from __future__ import annotations

import json

import pytest

from tests import tiny

PROMPTS = [
    {"id": "f1", "category": "facts", "prompt": "Capital of France?", "answer": "Paris"},
    {"id": "a1", "category": "arithmetic", "prompt": "What is 2 + 3?", "answer": "5"},
    {"id": "c1", "category": "chat", "prompt": "Hi!"},
    {"id": "k1", "category": "code", "prompt": "Write a Python function that adds."},
]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_ruyi")
    tiny.save_ruyi(path, "qwen2", [1, 2, 4], num_layers=5)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from ruyiflow.engine.checkpoint import load_model

    return load_model(str(tiny_dir))


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path
