"""The Ruyi-7B part of `ruyiflow bench gpu` (random weights, Qwen2.5-7B dims, bf16): decode per
exit vs the HBM bound and vs transformers, batch 64 vs single stream at 512 tokens, the batch the
default memory fraction admits at 2,048 tokens, hidden handoffs, CUDA graphs vs eager."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ruyiflow.bench import gpu_figures as fig
from ruyiflow.bench import gpu_models as models
from ruyiflow.bench.gpu_report import Report
from ruyiflow.engine.cuda_graphs import GraphConfig
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.kv_pool import CacheConfig
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.engine.torch_runner import TorchRunner

BATCH, CONTEXT, ADMIT_CONTEXT = 64, 512, 2048
HANDOFF_CONTEXTS = (512, 4096)


def dense_figures(args: argparse.Namespace, device: torch.device, path: Path, report: Report):
    dry = args.dry_run
    dtype, dtype_name = (torch.float32, "float32") if dry else (torch.bfloat16, "bfloat16")
    n = 8 if dry else args.tokens
    hf = models.random_hf_model(models.ruyi_7b_config(dry), dtype, device)
    hf_rate = fig.transformers_rate(hf, n, device)
    size = models.save_checkpoint(hf, path)
    del hf
    _release(device)
    loaded, load_s, peak = models.load_measured(path, dtype_name, device, models.RUYI_EXITS)
    report.note(
        f"Ruyi-7B dims: {size / 2**30:.2f} GiB checkpoint loaded onto {device} in {load_s:.1f} s; "
        f"peak host RSS while loading {peak / size:.2f}x the checkpoint"
    )
    exits, model = loaded.config.exits, loaded.model
    last = exits[-1]

    default = TorchRunner(loaded)  # the pool a node would make: the default memory fraction
    admitted = default.allocator.num_blocks // default.allocator.layout.blocks_for(
        last, ADMIT_CONTEXT
    )
    pool_gib = default.pool.pages.numel() * default.pool.pages.element_size() / 2**30
    report.note(
        f"default pool: {pool_gib:.1f} GiB, {default.allocator.num_blocks} pages of "
        f"{default.pool.block_size}; admits "
        f"{admitted} sequences of {ADMIT_CONTEXT} tokens at exit {last}"
    )
    del default
    _release(device)

    budget = (64 << 20) if dry else int(args.kv_gib * 2**30)
    runner = TorchRunner(loaded, CacheConfig(kv_cache_bytes=budget))
    bandwidth = fig.copy_bandwidth(device, gib=0.25 if dry else 2.0)
    fig.decode_rate(Engine(runner, max_batch=1), last, 4)  # warm-up: Triton compiles its kernels
    rates = {e: fig.decode_rate(Engine(runner, max_batch=1), e, n) for e in exits}
    for e in exits:
        bound = bandwidth / fig.token_bytes(model, e)
        target = 0.75 if e == last else None
        report.add(f"exit {e} single stream (tok/s)", rates[e], "HBM bound", bound, target)
    depth = (last + 1) / (exits[0] + 1)
    report.add(
        f"exit {exits[0]} speed-up over exit {last}",
        rates[exits[0]] / rates[last],
        "depth ratio",
        depth,
        0.85,
    )
    report.add(
        f"exit {last} single stream (tok/s)", rates[last], "transformers generate", hf_rate, 5
    )

    context = 64 if dry else CONTEXT
    batch = 8 if dry else BATCH
    step_tokens = batch * (context + 1)
    single = fig.decode_rate(Engine(runner, 1, max_step_tokens=step_tokens), last, n, 1, context)
    wide = fig.decode_rate(
        Engine(runner, batch, max_step_tokens=step_tokens), last, n, batch, context
    )
    report.add(f"batch {batch} at {context} ctx (tok/s)", wide, "single stream", single, 30)

    for ctx in (64, 256) if dry else HANDOFF_CONTEXTS:
        engine = Engine(runner, 1, max_step_tokens=ctx + 16)
        cost = fig.handoff_cost(engine, exits[2], ctx)
        report.note(
            f"hidden handoff at exit {exits[2]}, {ctx} tokens: {cost['bytes'] / 2**20:.1f} MiB, "
            f"export (device -> bytes) {cost['export_ms']:.1f} ms, import (bytes -> device) "
            f"{cost['import_ms']:.1f} ms"
        )
    del runner
    _release(device)
    if device.type == "cuda":
        graph_figures(loaded, n, last, rates[last], report)


def graph_figures(loaded, n: int, last: int, eager_rate: float, report: Report) -> None:
    """Single-stream decode with CUDA graphs vs eager, and whether their greedy tokens agree."""
    cache = CacheConfig(kv_cache_bytes=4 << 30)
    runner = TorchRunner(loaded, cache, GraphConfig(enabled=True, max_context=4096))
    fig.decode_rate(Engine(runner, max_batch=1), last, 4)  # warm-up: captures the 1-row graph
    graphed = fig.decode_rate(Engine(runner, max_batch=1), last, n)
    report.add(f"exit {last} with CUDA graphs (tok/s)", graphed, "eager", eager_rate)
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    got = [e.token_id for e in Engine(runner, 1).generate(fig.PROMPT, params, last)]
    eager = TorchRunner(loaded, cache)
    want = [e.token_id for e in Engine(eager, 1).generate(fig.PROMPT, params, last)]
    report.note(
        f"CUDA graphs: {runner.graphs.num_replays} replays; greedy tokens "
        f"{'equal' if got == want else 'DIFFER from'} eager over {len(want)} tokens"
    )


def _release(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
