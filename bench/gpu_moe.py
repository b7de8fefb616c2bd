"""The MoE part of `ruyiflow bench gpu`: JoyAI-LLM Flash's DeepSeek-V3 config (MLA, 256 experts
top-8) cut to `--moe-layers`, random bf16 weights: the fused MoE Triton kernel vs its torch
reference at its expert shape, and decode tokens/s vs transformers `generate`."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ruyiflow.bench import gpu_figures as fig
from ruyiflow.bench import gpu_models as models
from ruyiflow.bench.gpu_dense import _release
from ruyiflow.bench.gpu_report import Report
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.kv_pool import CacheConfig
from ruyiflow.engine.torch_runner import TorchRunner

TOKEN_COUNTS = [1, 16, 64, 256]


def moe_figures(args: argparse.Namespace, device: torch.device, path: Path, report: Report):
    dry = args.dry_run
    dtype, dtype_name = (torch.float32, "float32") if dry else (torch.bfloat16, "bfloat16")
    n = 8 if dry else args.tokens
    shape = models.TINY_MOE if dry else models.JOYAI_FLASH
    experts, top_k = shape["n_routed_experts"], shape["num_experts_per_tok"]
    hidden, inter = shape["hidden_size"], shape["moe_intermediate_size"]
    for row in fig.fused_moe_rows(experts, top_k, hidden, inter, TOKEN_COUNTS, device):
        report.add(
            f"fused MoE E={experts} k={top_k} at {row['tokens']} tokens (1/ms)",
            1 / row["triton_ms"],
            "torch reference (1/ms)",
            1 / row["reference_ms"],
            3 if row["tokens"] == 64 else None,
        )
    hf = models.random_hf_model(models.joyai_config(args.moe_layers, dry), dtype, device)
    hf_rate = fig.transformers_rate(hf, n, device)
    size = models.save_checkpoint(hf, path)
    del hf
    _release(device)
    loaded, load_s, peak = models.load_measured(path, dtype_name, device)
    report.note(
        f"JoyAI-LLM Flash cut to {args.moe_layers} layers: {size / 2**30:.2f} GiB checkpoint "
        f"loaded in {load_s:.1f} s; peak host RSS while loading {peak / size:.2f}x the checkpoint"
    )
    budget = (64 << 20) if dry else (4 << 30)
    runner = TorchRunner(loaded, CacheConfig(kv_cache_bytes=budget))
    last = loaded.config.last_exit
    fig.decode_rate(Engine(runner, max_batch=1), last, 4)  # warm-up: Triton compiles its kernels
    rate = fig.decode_rate(Engine(runner, max_batch=1), last, n)
    report.add(
        f"MoE {args.moe_layers} layers single stream (tok/s)",
        rate,
        "transformers generate",
        hf_rate,
    )
