"""Tiny random checkpoints in Hugging Face layout, built with transformers' own classes, for
parity tests of the qwen2 / qwen3 / ruyi families (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 320  # 256 byte tokens + merges-free specials; enough for ids we feed by hand


def tiny_tokenizer(path: Path) -> None:
    """A byte-level tokenizer.json with a ChatML-ish template, so our loader finds one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(path / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": template,
                "eos_token": "<|im_end|>",
                "bos_token": None,
            }
        )
    )


def hf_config(family: str, num_layers: int = 4, **extra):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "llama": LlamaConfig}[family]
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if family == "qwen3":
        kwargs["head_dim"] = 24  # not hidden/heads, as in real Qwen3 configs
    kwargs.update(extra)
    return cls(**kwargs)


def hf_model(family: str, num_layers: int = 4, seed: int = 0, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        hf_config(family, num_layers, **extra), dtype=torch.float32
    )
    # random init leaves norms at 1 and biases at 0: perturb them so they matter in the parity
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def save_plain(path: Path, family: str, num_layers: int = 4, seed: int = 0):
    model = hf_model(family, num_layers, seed)
    model.save_pretrained(path)
    tiny_tokenizer(path)
    return model


def save_ruyi(path: Path, base: str, exits: list[int], num_layers: int = 4, seed: int = 0):
    """A ruyi_<base> checkpoint: trunk from one random model, branch layers/norms/heads from
    others. Returns the state dict written (released key names)."""
    from safetensors.torch import save_file

    trunk = hf_model(base, num_layers, seed)
    state = {
        k: v.clone()
        for k, v in trunk.state_dict().items()
        if not k.startswith(("lm_head", "model.norm"))
    }
    for j, e in enumerate(exits):
        donor = hf_model(base, num_layers, seed + 100 + j).state_dict()
        if e != num_layers - 1:
            for k, v in donor.items():
                if k.startswith(f"model.layers.{e}."):
                    state[k.replace(f"model.layers.{e}.", f"model.eelayers.{j}.")] = v.clone()
        state[f"model.norms.{j}.weight"] = donor["model.norm.weight"].clone()
        state[f"lm_head.{j}.weight"] = donor["lm_head.weight"].clone()
    config = trunk.config.to_dict()
    config.update(
        model_type=f"ruyi_{base}",
        early_exit_points=exits,
        default_early_exit_point=exits[-1],
        shared_heads=False,
        architectures=[f"Ruyi{base.capitalize()}ForCausalLM"],
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    tiny_tokenizer(path)
    return state, trunk.config


def branch_as_plain(state: dict, config, exits: list[int], exit_layer: int):
    """The plain HF model equal to Ruyi branch `exit_layer`: layers[0:e] + branch layer, norm,
    head."""
    from transformers import AutoModelForCausalLM

    j = exits.index(exit_layer)
    num_layers = config.num_hidden_layers
    fields = {**config.to_dict(), "num_hidden_layers": exit_layer + 1}
    if fields.get("layer_types"):
        fields["layer_types"] = fields["layer_types"][: exit_layer + 1]
    cfg = config.__class__(**fields)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {}
    for k, v in state.items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i < exit_layer or (i == exit_layer and exit_layer == num_layers - 1):
                sd[k] = v
        elif k.startswith(f"model.eelayers.{j}.") and exit_layer != num_layers - 1:
            sd[k.replace(f"model.eelayers.{j}.", f"model.layers.{exit_layer}.")] = v
    sd["model.embed_tokens.weight"] = state["model.embed_tokens.weight"]
    sd["model.norm.weight"] = state[f"model.norms.{j}.weight"]
    sd["lm_head.weight"] = state[f"lm_head.{j}.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return model.eval()
