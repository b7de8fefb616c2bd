"""Read a llama-architecture GGUF file (`gguf_file.GGUFFile`): config from its metadata, tensors
dequantized to float32 (`gguf_quants`) and renamed to Hugging Face keys, Q/K rows un-permuted.
Tensors are dequantized one at a time, when the model builder asks for them (`GGUFTensors`), so
the float32 form of the whole model never exists at once.

llama.cpp's converter permutes q_proj/k_proj rows so RoPE can rotate adjacent pairs; Hugging Face
rotates halves. `_unpermute` restores the HF order so the same RoPE code serves both sources.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ruyiflow.engine.config import ModelConfig, RopeConfig
from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.engine.loaders.gguf_file import GGUFFile, TensorInfo
from ruyiflow.engine.loaders.gguf_quants import dequantize

LAYER_KEYS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_KEYS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: Path) -> GGUFFile:
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file not found")
    return GGUFFile(path)  # ModelLoadError when corrupt


def gguf_config(reader: GGUFFile) -> ModelConfig:
    arch = reader.get("general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} unsupported (only llama)")

    def need(key: str) -> Any:
        value = reader.get(f"llama.{key}")
        if value is None:
            raise ModelLoadError(f"GGUF metadata is missing llama.{key}")
        return value

    num_layers = int(need("block_count"))
    hidden = int(need("embedding_length"))
    num_heads = int(need("attention.head_count"))
    names = {t.name for t in reader.tensors}
    vocab = reader.get("llama.vocab_size") or len(reader.get("tokenizer.ggml.tokens", []))
    eos = reader.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        family="llama",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(reader.get("llama.attention.head_count_kv", num_heads)),
        head_dim=int(reader.get("llama.rope.dimension_count", hidden // num_heads)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope=RopeConfig(theta=float(reader.get("llama.rope.freq_base", 10000.0))),
        max_position_embeddings=int(need("context_length")),
        exits=(num_layers - 1,),
        default_exit=num_layers - 1,
        tie_word_embeddings="output.weight" not in names,
        shared_heads=True,
        bos_token_id=reader.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
    )


def _unpermute(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary row permutation of a [heads*D, hidden] projection."""
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


class GGUFTensors(Mapping[str, torch.Tensor]):
    """float32 tensors by Hugging Face key, dequantized when indexed."""

    def __init__(self, reader: GGUFFile, config: ModelConfig):
        self.config = config
        self._tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            base, _, kind = t.name.rpartition(".")
            if base.startswith("blk."):
                _, idx, part = base.split(".", 2)
                if part not in LAYER_KEYS:
                    raise ModelLoadError(f"GGUF tensor {t.name!r} unknown")
                key = f"model.layers.{idx}.{LAYER_KEYS[part]}.{kind}"
            elif base in TOP_KEYS:
                key = f"{TOP_KEYS[base]}.{kind}"
            else:
                raise ModelLoadError(f"GGUF tensor {t.name!r} unknown")
            self._tensors[key] = t

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensors[key].shape))  # GGUF: fastest first

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self._tensors[key]
        try:
            array = dequantize(t).reshape(self.shape(key))
        except (ValueError, NotImplementedError) as exc:
            raise ModelLoadError(f"GGUF tensor {t.name!r}: cannot dequantize ({exc})") from exc
        tensor = torch.from_numpy(array)  # dequantize returns a new array: owned, writable
        if key.endswith("q_proj.weight"):
            tensor = _unpermute(tensor, self.config.num_heads)
        elif key.endswith("k_proj.weight"):
            tensor = _unpermute(tensor, self.config.num_kv_heads)
        return tensor

    def __contains__(self, key: object) -> bool:  # Mapping's default would dequantize it
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def gguf_tensors(reader: GGUFFile, config: ModelConfig) -> GGUFTensors:
    """float32 tensors by Hugging Face key, read lazily."""
    return GGUFTensors(reader, config)
