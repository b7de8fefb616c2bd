"""One branch of a familial checkpoint as a plain Qwen2 / Qwen3 / Llama checkpoint in Hugging
Face layout, so an engine that knows nothing of early exits (vLLM, SGLang) serves it unchanged.

Branch e is `layers[0:e]`, then its branch layer (Ruyi's `eelayers[j]`, or `layers[N-1]` at the
last exit), its norm and its head: the plain model has e + 1 layers, the branch layer becoming
`layers[e]`, the branch norm `model.norm` and the branch head `lm_head` (never tied: a branch
head is not the embedding). Weights come from the model as ruyiflow serves it (overlay of
trained exits included), un-fused back into Hugging Face's names; config.json keeps the source's
fields where it has one (rope scaling, eps, ids) with the Ruyi ones removed; the tokenizer files
are copied, or written from a GGUF's vocabulary and chat template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ruyiflow.engine.checkpoint import EMBEDDED, LoadedModel, load_model
from ruyiflow.engine.config import ModelConfig
from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.engine.layers import LayerWeights

PLAIN = {"ruyi_qwen2": "qwen2", "ruyi_qwen3": "qwen3"}  # other dense families stay as they are
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
RUYI_FIELDS = ("early_exit_points", "default_early_exit_point", "shared_heads", "auto_map")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)  # fmt: skip


def layer_tensors(prefix: str, w: LayerWeights, c: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face tensors of one decoder layer (q/k/v and gate/up split back apart)."""
    q_rows, kv_rows = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    att, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
    q, k, v = w.w_qkv.split([q_rows, kv_rows, kv_rows])
    gate, up = w.w_gate_up.split([c.intermediate_size, c.intermediate_size])
    out = {
        f"{prefix}.input_layernorm.weight": w.input_norm,
        f"{prefix}.post_attention_layernorm.weight": w.post_norm,
        f"{att}.q_proj.weight": q,
        f"{att}.k_proj.weight": k,
        f"{att}.v_proj.weight": v,
        f"{att}.o_proj.weight": w.w_o,
        f"{mlp}.gate_proj.weight": gate,
        f"{mlp}.up_proj.weight": up,
        f"{mlp}.down_proj.weight": w.w_down,
    }
    if w.b_qkv is not None:
        qb, kb, vb = w.b_qkv.split([q_rows, kv_rows, kv_rows])
        out |= {f"{att}.q_proj.bias": qb, f"{att}.k_proj.bias": kb, f"{att}.v_proj.bias": vb}
    if w.q_norm is not None:
        out |= {f"{att}.q_norm.weight": w.q_norm, f"{att}.k_norm.weight": w.k_norm}
    return out


def branch_tensors(loaded: LoadedModel, exit_layer: int) -> dict[str, torch.Tensor]:
    model, c = loaded.model, loaded.config
    branch = model.branches[exit_layer]
    out = {"model.embed_tokens.weight": model.embed}
    for i in range(exit_layer):
        out |= layer_tensors(f"model.layers.{i}", model.layers[i], c)
    out |= layer_tensors(f"model.layers.{exit_layer}", branch.layer, c)
    out |= {"model.norm.weight": branch.norm, "lm_head.weight": branch.head}
    # safetensors refuses shared storage: every tensor gets its own contiguous copy
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def plain_config(loaded: LoadedModel, source: Path | None, exit_layer: int, dtype: str) -> dict:
    """config.json of the plain model: the source's fields (Ruyi ones dropped) or, for a GGUF,
    the fields ruyiflow read from it."""
    c = loaded.config
    family = PLAIN.get(c.family, c.family)
    if source is not None and (source / "config.json").is_file():
        d: dict[str, Any] = json.loads((source / "config.json").read_text())
        for key in RUYI_FIELDS:
            d.pop(key, None)
    else:
        d = {
            "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope.theta,
            "max_position_embeddings": c.max_position_embeddings, "hidden_act": "silu",
            "bos_token_id": c.bos_token_id,
            "eos_token_id": list(c.eos_token_ids) if c.eos_token_ids else None,
        }  # fmt: skip
        if c.rope.rope_type != "default":
            raise ModelLoadError(f"rope type {c.rope.rope_type!r} from a GGUF is not written")
    d |= {
        "model_type": family,
        "architectures": [ARCHITECTURES[family]],
        "num_hidden_layers": exit_layer + 1,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][: exit_layer + 1]
    if isinstance(d.get("max_window_layers"), int):
        d["max_window_layers"] = min(d["max_window_layers"], exit_layer + 1)
    return d


def write_tokenizer(loaded: LoadedModel, source: Path | None, out: Path) -> None:
    if source is not None and source.is_dir():
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, out / name)
        return
    tok = loaded.tokenizer  # from a GGUF: write what transformers needs to rebuild it
    tok.backend.save(str(out / "tokenizer.json"))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **tok.special_tokens}
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": tok.bos_token_id, "eos_token_id": list(tok.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))


def convert_branch(model: str, exit_layer: int, out: str | Path, dtype: str = "float32") -> Path:
    """Write branch `exit_layer` of `model` (HF dir, .gguf or `smollm2`) to `out`; returns it."""
    from safetensors.torch import save_file

    loaded = load_model(model, dtype)
    if exit_layer not in loaded.config.exits:
        raise ModelLoadError(
            f"{model} has no exit {exit_layer} (exits {list(loaded.config.exits)})"
        )
    source = None if model == EMBEDDED else Path(model).expanduser()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = branch_tensors(loaded, exit_layer)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = plain_config(loaded, source, exit_layer, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(loaded, source, out)
    return out
