"""Load an MoE checkpoint directory (Hugging Face layout) into an `MoEModel`.

Tensors are read lazily from the safetensors shards, one at a time, so loading never holds the
checkpoint and the model at once: per-expert keys (`mlp.experts.{e}.{gate,up,down}_proj.weight`,
as the released files and `save_pretrained` write them) are copied straight into the stacked
`w_gate_up [E + S, 2I, H]` / `w_down [E + S, H, I]`, the shared expert appended as S slices
(`engine.moe.moe_block`). transformers-5's in-memory fused `experts.gate_up_proj` is accepted too.
Key names per family are in moe.md §1.4, §2.4, §3.4; every expected key must be present with its
expected shape and every other key is an error, except rotary buffers and DeepSeek MTP layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ruyiflow.engine.device import free_memory
from ruyiflow.engine.fingerprint import SampledTensors, fingerprint
from ruyiflow.engine.loaders.safetensors_loader import SafetensorsCheckpoint
from ruyiflow.engine.moe.config import MoEConfig
from ruyiflow.engine.moe.hf_config import moe_config_from_hf
from ruyiflow.engine.moe.memory import check_memory, estimate_memory
from ruyiflow.engine.moe.model import MoEModel
from ruyiflow.engine.moe.weights import build_layer
from ruyiflow.engine.weights import KeyReader

IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class MoEKeyReader(KeyReader):
    """KeyReader over lazily read shards; DeepSeek's next-token-prediction layers are skipped."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        config: MoEConfig,
        device: torch.device | str = "cpu",
    ):
        super().__init__(tensors, dtype, device)
        self.config = config

    def is_ignored(self, key: str) -> bool:
        if key.endswith(IGNORED_SUFFIXES):
            return True
        match = _LAYER.match(key)  # DeepSeek next-token-prediction layers follow the last layer
        c = self.config
        return bool(match) and c.num_layers <= int(match[1]) < c.num_layers + c.num_mtp_layers


def build_moe_model(
    config: MoEConfig,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> MoEModel:
    """Checkpoint tensors (released key names) -> MoEModel in `dtype` on `device`."""
    c = config
    keys = MoEKeyReader(tensors, dtype, c, device)
    vocab_shape = (c.vocab_size, c.hidden_size)
    embed = keys.take("model.embed_tokens.weight", vocab_shape)
    layers = [build_layer(keys, i) for i in range(c.num_layers)]
    norm = keys.take("model.norm.weight", (c.hidden_size,))
    head = keys.take_head(embed if c.tie_word_embeddings else None, vocab_shape)
    keys.check_all_used()
    return MoEModel(c, embed, layers, norm, head, dtype)


def load_moe_dir(
    path: Path,
    hf: dict[str, Any],
    dtype: torch.dtype,
    max_context: int | None = None,
    max_batch: int | None = None,
    available_bytes: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[MoEConfig, MoEModel, str]:
    """(config, model, fingerprint) of the MoE checkpoint at `path` whose parsed config.json is
    `hf`, on `device`. Refuses before reading any weight when weights + KV cache for `max_batch`
    sequences of `max_context` tokens do not fit in memory (`engine.moe.memory`; on CUDA, the
    device's free memory)."""
    config = moe_config_from_hf(hf)
    device = torch.device(device)
    if available_bytes is None and device.type == "cuda":
        available_bytes = free_memory(device)
    check_memory(estimate_memory(config, dtype, max_context, max_batch), available_bytes)
    tensors = SampledTensors(SafetensorsCheckpoint(path))
    model = build_moe_model(config, tensors, dtype, device)
    return config, model, fingerprint(config, tensors)
