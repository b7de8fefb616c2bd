"""Random-weight models with real configs for `ruyiflow bench gpu` (no download).

- Ruyi-7B: Qwen2.5-7B's dims (28 layers, hidden 3584, 28 query / 4 KV heads, vocab 152064) served
  as a family with exits 11/15/19/23/27 (branches 11..23 are copies of the layer after the exit,
  as Ruyi initialises them; the weights one token reads are those of a trained Ruyi-7B branch).
- JoyAI-LLM Flash: its DeepSeek-V3 config (MLA, 256 experts top-8, sigmoid + groups) with the
  layer count cut so the run fits the time.

Each is built with transformers' own class on the device, written with `save_pretrained` and read
back through our loader (`load_model(..., device=...)`), which is how a node loads; the peak host
RSS while loading is measured as a multiple of the checkpoint's size. `tiny=True` gives the same
shapes' structure at toy sizes (the script's dry run on CPU).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

RUYI_EXITS = (11, 15, 19, 23)  # plus the last layer, 27
QWEN25_7B = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
JOYAI_FLASH = dict(
    hidden_size=2048,
    num_hidden_layers=40,
    num_attention_heads=32,
    num_key_value_heads=32,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    intermediate_size=7168,
    moe_intermediate_size=768,
    n_routed_experts=256,
    num_experts_per_tok=8,
    n_shared_experts=1,
    n_group=8,
    topk_group=4,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    vocab_size=129280,
    rms_norm_eps=1e-6,
    rope_theta=3.2e7,
    max_position_embeddings=131072,
    num_nextn_predict_layers=0,
    tie_word_embeddings=False,
)
TINY_DENSE = dict(
    QWEN25_7B,
    hidden_size=128,
    intermediate_size=256,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=8192,
)
TINY_MOE = dict(
    JOYAI_FLASH,
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=48,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=16,
    v_head_dim=16,
    intermediate_size=128,
    moe_intermediate_size=32,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    vocab_size=8192,
)


def ruyi_7b_config(tiny: bool = False):
    from transformers import Qwen2Config

    return Qwen2Config(**(TINY_DENSE if tiny else QWEN25_7B))


def joyai_config(num_layers: int, tiny: bool = False):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **(TINY_MOE if tiny else JOYAI_FLASH) | {"num_hidden_layers": num_layers}
    )


def random_hf_model(config, dtype: torch.dtype, device: torch.device):
    """transformers' model of `config` with random weights, made on `device` in `dtype`, SDPA
    attention (the baseline of the bench)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def save_checkpoint(model, path: Path) -> int:
    """`save_pretrained` beside a byte-level tokenizer; returns the checkpoint's bytes."""
    from ruyiflow.bench.moe import write_tokenizer

    model.save_pretrained(path)
    write_tokenizer(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def load_measured(
    path: Path, dtype: str, device: torch.device, extra_exits: tuple[int, ...] | None = None
):
    """(loaded model, seconds, peak host RSS growth while loading in bytes). The peak (VmHWM)
    is reset to the current RSS first, so the growth is what loading itself took."""
    from ruyiflow.engine.checkpoint import load_model

    Path("/proc/self/clear_refs").write_text("5")
    base = _status_bytes("VmRSS:")
    started = time.perf_counter()
    loaded = load_model(str(path), dtype, extra_exits, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return loaded, seconds, _status_bytes("VmHWM:") - base
