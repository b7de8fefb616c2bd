"""`ruyiflow export-onnx`: write one branch of a model as an ONNX export (graph, weights,
tokenizer, manifest) for ONNX Runtime on edge machines; progress bar on stderr, summary on
stdout."""

from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model dir, .gguf file, or 'smollm2'")
    p.add_argument("--exit", type=int, required=True, help="exit layer whose branch is exported")
    p.add_argument("--out", required=True, help="output directory (empty, or a previous export)")
    p.add_argument("--quant", choices=["int8", "int4"], default=None, help="weight quantization")
    p.add_argument(
        "--dtype", choices=["float32"], default="float32", help="activations and KV cache"
    )
    p.add_argument(
        "--extra-exits", default=None, help="comma-separated exits to add to a plain model"
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="positions the RoPE table covers (default: min(max_position_embeddings, 8192))",
    )
    p.add_argument(
        "--keep-head-float", action="store_true", help="with --quant: leave the head in float32"
    )


def run(args: argparse.Namespace) -> int:
    from ruyiflow.cmd_generate import parse_ids
    from ruyiflow.engine.checkpoint import load_model
    from ruyiflow.export.onnx_export import export_branch
    from ruyiflow.progress import progress_bar

    started = time.perf_counter()
    extra = parse_ids(args.extra_exits) if args.extra_exits else None
    loaded = load_model(args.model, args.dtype, extra)
    with progress_bar(100, f"export exit {args.exit}", "%") as bar:
        manifest = export_branch(
            loaded,
            args.exit,
            args.out,
            quant=args.quant,
            progress=bar.report,
            max_context=args.max_context,
            quantize_head=not args.keep_head_float,
        )
    total = sum(f["bytes"] for f in manifest.files.values())
    print(f"exported     {args.out}")
    print(f"model        {manifest.model_name}  fingerprint {manifest.fingerprint}")
    print(f"exit         {manifest.exit}  ({manifest.facts.num_kv_layers} layers run)")
    print(f"quant        {manifest.quant or 'none (float32)'}")
    print(f"max context  {manifest.facts.max_context}")
    for name, f in manifest.files.items():
        print(f"  {name:<28} {f['bytes']:>14,} B  sha256 {f['sha256'][:16]}")
    print(f"total        {total / 2**20:.1f} MiB in {time.perf_counter() - started:.1f}s")
    return 0
