"""Tiny MoE checkpoints, written once per session: {variant: (path, transformers model, loaded)};
every pool returns to full after each test (`tests.engine.pool_check`)."""

from __future__ import annotations

import pytest

from tests.engine import pool_check
from tests.moe.tiny_moe import save_moe

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 128,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.8,
}
VARIANTS = {
    "hunyuan_v1_moe": ("hunyuan_v1_moe", {}),
    "dots1": ("dots1", {}),
    "deepseek_v3": ("deepseek_v3", {}),
    # YaRN rope with mscale: cos/sin attention factor and softmax scale both differ from 1
    "deepseek_v3_yarn": ("deepseek_v3", {"rope_parameters": YARN}),
    # no q LoRA (plain q_proj), rope not interleaved
    "deepseek_v3_plain_q": ("deepseek_v3", {"q_lora_rank": None, "rope_interleave": False}),
}


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory):
    """Build on first request: variant -> (checkpoint dir, transformers model, LoadedModel)."""
    from ruyiflow.engine.checkpoint import load_model

    built: dict[str, tuple] = {}

    def get(variant: str):
        if variant not in built:
            family, extra = VARIANTS[variant]
            path = tmp_path_factory.mktemp(variant)
            ref = save_moe(path, family, **extra)
            built[variant] = (path, ref, load_model(str(path)))
        return built[variant]

    return get


@pytest.fixture(autouse=True)
def pool_returns_to_full(monkeypatch: pytest.MonkeyPatch):
    yield from pool_check.pool_returns_to_full(monkeypatch)
