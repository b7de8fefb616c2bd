"""`ruyiflow convert-branch --model PATH --exit E --out DIR`: one branch of a familial model as
a plain Qwen2 / Qwen3 / Llama checkpoint in Hugging Face layout, for vLLM or SGLang behind a
`backend: openai` cloud node (deploy/vllm/)."""

from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model dir, .gguf file, or 'smollm2'")
    p.add_argument("--exit", type=int, required=True, help="exit layer whose branch is written")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="dtype of the written weights (bfloat16 for a GPU engine)",
    )


def run(args: argparse.Namespace) -> int:
    from ruyiflow.export.convert_branch import convert_branch

    started = time.perf_counter()
    out = convert_branch(args.model, args.exit, args.out, args.dtype)
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(
        f"wrote exit {args.exit} of {args.model} to {out} ({size:.1f} MiB, "
        f"{time.perf_counter() - started:.1f} s): serve it with e.g. `vllm serve {out}`"
    )
    return 0
