"""Assemble a FamilyModel from a flat `{hf_key: tensor}` dict named as the released checkpoints
name them (Llama / Qwen2 / Qwen3, and Ruyi's `eelayers` / `norms` / `lm_head.{j}`).

Every expected key must be present with the expected shape; extra keys are an error too, so a
wrong checkpoint never loads silently. Tensors are read one at a time from lazy checkpoint
mappings and converted straight onto the model's device: no second full copy on the host.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ruyiflow.engine.config import ModelConfig
from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.engine.layers import LayerWeights
from ruyiflow.engine.model import Branch, FamilyModel

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class KeyReader:
    """Takes tensors by key with a shape check, converting dtype and device on the way; tracks
    what was used so leftovers can be refused."""

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.tensors = tensors
        self.dtype = dtype
        self.device = torch.device(device)
        self.used: set[str] = set()

    def shape_of(self, key: str) -> tuple[int, ...]:
        shape = getattr(self.tensors, "shape", None)  # lazy mappings know shapes unread
        return shape(key) if callable(shape) else tuple(self.tensors[key].shape)

    def take(
        self, key: str, shape: tuple[int, ...], dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        if key not in self.tensors:
            raise ModelLoadError(f"checkpoint is missing tensor {key!r}")
        found = self.shape_of(key)
        if found != shape:
            raise ModelLoadError(f"tensor {key!r} has shape {found}, expected {shape}")
        self.used.add(key)
        return self.tensors[key].to(device=self.device, dtype=dtype or self.dtype).contiguous()

    def has(self, key: str) -> bool:
        return key in self.tensors

    def is_ignored(self, key: str) -> bool:
        return key.endswith(IGNORED_SUFFIXES)

    def check_all_used(self) -> None:
        extra = sorted(k for k in self.tensors if k not in self.used and not self.is_ignored(k))
        if extra:
            more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
            raise ModelLoadError(f"unexpected tensors in checkpoint: {extra[:5]}{more}")

    def take_head(self, tied_to: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """`lm_head.weight`, or the embedding when tied (a stored copy is consumed, unused)."""
        if tied_to is None:
            return self.take("lm_head.weight", shape)
        if self.has("lm_head.weight"):  # some tied checkpoints store the copy anyway
            self.take("lm_head.weight", shape)
        return tied_to


def _layer(keys: KeyReader, prefix: str, c: ModelConfig) -> LayerWeights:
    hid, inter, d = c.hidden_size, c.intermediate_size, c.head_dim
    q_rows, kv_rows = c.num_heads * d, c.num_kv_heads * d
    att = f"{prefix}.self_attn"
    w_qkv = torch.cat(
        [
            keys.take(f"{att}.q_proj.weight", (q_rows, hid)),
            keys.take(f"{att}.k_proj.weight", (kv_rows, hid)),
            keys.take(f"{att}.v_proj.weight", (kv_rows, hid)),
        ]
    )
    b_qkv = None
    if c.attention_bias:
        b_qkv = torch.cat(
            [
                keys.take(f"{att}.q_proj.bias", (q_rows,)),
                keys.take(f"{att}.k_proj.bias", (kv_rows,)),
                keys.take(f"{att}.v_proj.bias", (kv_rows,)),
            ]
        )
    q_norm = k_norm = None
    if c.qk_norm:
        q_norm = keys.take(f"{att}.q_norm.weight", (d,))
        k_norm = keys.take(f"{att}.k_norm.weight", (d,))
    mlp = f"{prefix}.mlp"
    return LayerWeights(
        input_norm=keys.take(f"{prefix}.input_layernorm.weight", (hid,)),
        post_norm=keys.take(f"{prefix}.post_attention_layernorm.weight", (hid,)),
        w_qkv=w_qkv,
        b_qkv=b_qkv,
        w_o=keys.take(f"{att}.o_proj.weight", (hid, q_rows)),
        q_norm=q_norm,
        k_norm=k_norm,
        w_gate_up=torch.cat(
            [
                keys.take(f"{mlp}.gate_proj.weight", (inter, hid)),
                keys.take(f"{mlp}.up_proj.weight", (inter, hid)),
            ]
        ),
        w_down=keys.take(f"{mlp}.down_proj.weight", (hid, inter)),
    )


def build_model(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> FamilyModel:
    """Checkpoint tensors -> FamilyModel in `dtype` (float32 / bfloat16 / float16) on `device`."""
    c = config
    keys = KeyReader(tensors, dtype, device)
    vocab_shape = (c.vocab_size, c.hidden_size)
    embed = keys.take("model.embed_tokens.weight", vocab_shape)
    layers = [_layer(keys, f"model.layers.{i}", c) for i in range(c.num_layers)]
    branches: dict[int, Branch] = {}
    if c.native_branches:
        shared_head = None
        if c.shared_heads:
            shared_head = (
                embed if c.tie_word_embeddings else keys.take("lm_head.weight", vocab_shape)
            )
        for j, e in enumerate(c.exits):
            layer = layers[e] if e == c.last_exit else _layer(keys, f"model.eelayers.{j}", c)
            norm = keys.take(f"model.norms.{j}.weight", (c.hidden_size,))
            head = (
                shared_head
                if shared_head is not None
                else keys.take(f"lm_head.{j}.weight", vocab_shape)
            )
            branches[e] = Branch(layer, norm, head)
    else:
        # Plain model served as a family: branch layer = layers[e] (same tensors, no copy),
        # final norm and the one head for every exit.
        norm = keys.take("model.norm.weight", (c.hidden_size,))
        head = keys.take_head(embed if c.tie_word_embeddings else None, vocab_shape)
        for e in c.exits:
            branches[e] = Branch(layers[e], norm, head)
    keys.check_all_used()
    return FamilyModel(c, embed, layers, branches, dtype)
