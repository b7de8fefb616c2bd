"""`ruyiflow distill`: train a model's shallow exit branches by self-distillation towards its last
exit and write them as an overlay; `--report` only measures exit quality (untrained copies vs an
overlay) on held-out prompts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ruyiflow.engine.errors import InvalidRequest


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model dir, .gguf file, or 'smollm2'")
    p.add_argument("--exits", default="12,16,20,24", help="comma-separated shallow exits to train")
    p.add_argument("--out", default=None, help="output dir (corpus, features, checkpoints)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 * rank)")
    p.add_argument("--tokens", type=int, default=40000, help="answer tokens in the corpus")
    p.add_argument("--max-new-tokens", type=int, default=128, help="longest generated answer")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of next-token CE")
    p.add_argument("--top-k", type=int, default=64, help="teacher tokens kept per position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    p.add_argument("--prompts", default=None, help="prompt file (default: shipped seed prompts)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--report", action="store_true", help="only print the exit quality table")
    p.add_argument(
        "--overlay",
        default=None,
        help="overlay for --report (default: OUT/overlay.safetensors, else the shipped one)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_exits(text: str) -> tuple[int, ...]:
    try:
        exits = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError as exc:
        raise InvalidRequest(f"--exits must be comma-separated integers ({exc})") from exc
    if not exits:
        raise InvalidRequest("--exits names no exit")
    return exits


def report_overlay(args: argparse.Namespace, exits: tuple[int, ...]) -> Path | None:
    from ruyiflow.distill.pipeline import OVERLAY_FILE
    from ruyiflow.engine.checkpoint import EMBEDDED, EMBEDDED_EXTRA_EXITS, EMBEDDED_OVERLAY

    if args.overlay is not None:
        return None if args.overlay == "none" else Path(args.overlay)
    if args.out is not None and (Path(args.out) / OVERLAY_FILE).is_file():
        return Path(args.out) / OVERLAY_FILE
    if args.model == EMBEDDED and exits == EMBEDDED_EXTRA_EXITS and EMBEDDED_OVERLAY.is_file():
        return EMBEDDED_OVERLAY
    return None


def run_report(args: argparse.Namespace, exits: tuple[int, ...]) -> int:
    import torch

    torch.set_num_threads(args.threads)
    from ruyiflow.distill.pipeline import compare, held_out_samples, load_base
    from ruyiflow.distill.quality import quality_table

    loaded = load_base(args.model, exits)
    held = held_out_samples(loaded, args.out, args.prompts, args.max_new_tokens)
    overlay = report_overlay(args, exits)
    untrained, trained = compare(loaded, held, overlay)
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "overlay": str(overlay) if overlay else None,
                    "untrained": [q.to_dict() for q in untrained],
                    "trained": [q.to_dict() for q in trained] if trained else None,
                },
                indent=2,
            )
        )
    else:
        print(f"overlay: {overlay or 'none'}")
        print(quality_table(untrained, trained))
    return 0


def run(args: argparse.Namespace) -> int:
    exits = parse_exits(args.exits)
    if args.report:
        return run_report(args, exits)
    if args.out is None:
        raise InvalidRequest("--out DIR is required for training")
    from ruyiflow.distill.corpus import CorpusSettings
    from ruyiflow.distill.pipeline import distill
    from ruyiflow.distill.quality import quality_table
    from ruyiflow.distill.train import TrainSettings

    corpus = CorpusSettings(tokens=args.tokens, max_new_tokens=args.max_new_tokens, seed=args.seed)
    train = TrainSettings(
        exits=exits,
        rank=args.rank,
        alpha=2.0 * args.rank if args.alpha is None else args.alpha,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ce_weight=args.ce_weight,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        warmup_steps=min(10, max(args.steps // 10, 1)),
    )
    result = distill(
        args.model,
        exits,
        Path(args.out),
        corpus,
        train,
        top_k=args.top_k,
        prompts_file=args.prompts,
        resume=args.resume,
        quiet=args.quiet,
        num_threads=args.threads,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(
        f"overlay {result.overlay} ({result.overlay_bytes / 1e6:.2f} MB): {result.steps} steps "
        f"in {result.train_seconds:.0f}s this run, {result.num_train_samples} samples, "
        f"{result.num_train_tokens} answer tokens ({result.num_rows} tokens per epoch)"
    )
    print(quality_table(result.untrained, result.trained))
    return 0
