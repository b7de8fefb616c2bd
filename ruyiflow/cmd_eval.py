"""`ruyiflow eval`: routing evaluation.

    ruyiflow eval exits --prompts FILE --out results.jsonl [--features first.npz] [--model ...]
    ruyiflow eval routing --prompts FILE [--results results.jsonl] [--scorer scorer.onnx]
                          [--plot out.png] [--json]

`exits` runs every prompt through every exit (greedy, chat template, batched in one engine) and
appends one record per prompt to --out; an existing file is resumed (finished prompts are kept;
--overwrite starts again). `--features` also writes what the confidence gate sees at each
shallow exit (`ruyiflow.evaluation.features`: first-token confidence, pooled boundary states;
prefill only, so it is quick to add to finished results). `routing` compares routing policies
on the same prompts with RouteLLM's metrics (ruyiflow.evaluation.metrics) and prints a table,
or one JSON object per policy with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ruyiflow.engine.errors import InvalidRequest, ModelMismatch


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="eval_command", required=True)
    exits = sub.add_parser("exits", help="run every prompt through every exit")
    exits.add_argument("--prompts", required=True, help="prompt set (JSON Lines)")
    exits.add_argument("--out", required=True, help="results file (JSON Lines), resumed if present")
    exits.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    exits.add_argument("--features", help="also write the gate's first-token features (.npz)")
    _add_run_arguments(exits)
    routing = sub.add_parser("routing", help="compare routing policies (RouteLLM metrics)")
    routing.add_argument("--prompts", required=True, help="prompt set (JSON Lines)")
    routing.add_argument("--results", help="`eval exits` results (default: run the exits now)")
    routing.add_argument("--scorer", help="learned scorer model file (adds `learned` policies)")
    routing.add_argument(
        "--plot", help="write a PNG of quality vs compute here (needs the `plot` extra)"
    )
    routing.add_argument("--json", action="store_true", help="one JSON object per policy")
    routing.add_argument("--quality", choices=["agreement", "answer"], default="agreement")
    routing.add_argument(
        "--topology",
        help="take thresholds/escalation/tiers from this file; with features, adds `default`: "
        "exactly what it routes (scorer, thresholds, calibrated gate, escalation)",
    )
    routing.add_argument(
        "--features", help="first-token features (default <results>.features.npz): gate policies"
    )
    routing.add_argument(
        "--probes", help="probes directory (default: shipped for the embedded model; 'none')"
    )
    routing.add_argument("--no-escalation", action="store_true", help="skip escalation policies")
    routing.add_argument(
        "--escalation-cache", help="reuse escalation runs saved here with the same settings"
    )
    routing.add_argument("--escalation-window", type=int, default=None)
    routing.add_argument("--escalation-threshold", type=float, default=None)
    routing.add_argument("--seeds", type=int, default=200, help="random-policy seeds per point")
    routing.add_argument(
        "--cloud-above", type=int, default=None, help="exits above this run on the cloud (16)"
    )
    _add_run_arguments(routing)


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="model dir, .gguf file or 'smollm2'")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per run (default 48)")
    p.add_argument("--batch", type=int, default=32, help="runs sharing one engine step")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's); 1 is far faster on a busy shared machine",
    )


def run(args: argparse.Namespace) -> int:
    from ruyiflow.evaluation.prompts import load_prompts

    if getattr(args, "plot", None):
        from ruyiflow.evaluation.plot import require_matplotlib

        require_matplotlib()  # before minutes of runs, not after them
    prompts = load_prompts(args.prompts)[: args.limit]
    if args.batch < 1 or (args.max_tokens is not None and args.max_tokens < 1):
        raise InvalidRequest("--batch and --max-tokens must be >= 1")
    started = time.perf_counter()
    code = (run_exits if args.eval_command == "exits" else run_routing)(args, prompts)
    print(f"[eval {args.eval_command}: {time.perf_counter() - started:.1f}s]", file=sys.stderr)
    return code


def _load(args: argparse.Namespace):
    import torch

    from ruyiflow.engine.checkpoint import load_model
    from ruyiflow.evaluation.runner import make_engine

    if args.threads is not None:
        if args.threads < 1:
            raise InvalidRequest("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    return make_engine(load_model(args.model, args.dtype), args.batch)


def _exits_to(path: Path | None, engine, prompts, max_tokens: int, overwrite: bool) -> list:
    """Run the prompts not yet in `path` and append them (None: keep them in memory only);
    returns every prompt's result."""
    from ruyiflow.evaluation.results import append_result, build_result, load_results
    from ruyiflow.evaluation.runner import run_exits

    fingerprint = engine.fingerprint
    if path is not None and overwrite and path.exists():
        path.unlink()
    done = {}
    if path is not None and path.exists() and path.stat().st_size:
        text = path.read_text(encoding="utf-8")
        if not text.endswith("\n"):  # interrupted mid-write: drop the partial last line
            path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
        done = {r.id: r for r in load_results(path)} if path.stat().st_size else {}
        for r in done.values():
            if r.fingerprint != fingerprint or r.max_tokens != max_tokens:
                raise ModelMismatch(
                    f"{path} was made with another model or --max-tokens ({r.fingerprint},"
                    f" {r.max_tokens}); use --overwrite or another --out"
                )
        print(f"resuming {path}: {len(done)} prompts already done", file=sys.stderr)
    todo = [p for p in prompts if p.id not in done]

    def write(prompt, runs) -> None:
        result = build_result(
            prompt,
            {e: (r.token_ids, r.text, r.max_prob) for e, r in runs.items()},
            runs[engine.config.exits[-1]].num_prompt_tokens,
            fingerprint,
            max_tokens,
        )
        if path is not None:
            append_result(path, result)
        done[prompt.id] = result

    if todo:
        run_exits(engine, todo, max_tokens, write)
    return [done[p.id] for p in prompts]


def run_exits(args: argparse.Namespace, prompts) -> int:
    out = Path(args.out)
    engine = _load(args)
    results = _exits_to(out, engine, prompts, args.max_tokens or 48, args.overwrite)
    _print_exit_summary(results, sys.stderr)
    if args.features:
        from ruyiflow.evaluation.features import prompts_first_tokens

        table = prompts_first_tokens(engine, prompts)
        table.save(args.features)
        firsts = {r.id: r for r in results}
        differ = sum(
            int(table.token[i, j]) != firsts[pid].exits[e].token_ids[0]
            for i, pid in enumerate(table.ids)
            for j, e in enumerate(table.exits)
        )
        print(
            f"wrote {args.features}: {len(table.ids)} prompts x exits {list(table.exits)}; "
            f"{differ} first tokens differ from the results' runs",
            file=sys.stderr,
        )
    return 0


def _print_exit_summary(results, stream) -> None:
    exits = list(results[0].exits)
    print("exit  mean agreement  answer accuracy  label share", file=stream)
    for e in exits:
        agree = sum(r.exits[e].agreement for r in results) / len(results)
        answered = [r.exits[e].answer_match for r in results if r.exits[e].answer_match is not None]
        acc = f"{sum(answered) / len(answered):.3f}" if answered else "-"
        label = sum(r.label_exit == e for r in results) / len(results)
        print(f"{e:4d}  {agree:14.3f}  {acc:>15}  {label:11.3f}", file=stream)


def run_routing(args: argparse.Namespace, prompts) -> int:
    from ruyiflow.evaluation import routing
    from ruyiflow.evaluation.gate_setup import default_lines, gate_eval
    from ruyiflow.evaluation.report import format_table, summarise_curves
    from ruyiflow.evaluation.results import load_results

    overrides = {}
    if args.escalation_window is not None or args.escalation_threshold is not None:
        from ruyiflow.node.escalation import EscalationSettings

        base = routing.RoutingSetup().escalation
        overrides["escalation"] = EscalationSettings(
            enabled=True,
            window=args.escalation_window or base.window,
            threshold=args.escalation_threshold or base.threshold,
        )
    overrides["num_seeds"] = args.seeds
    if args.cloud_above is not None:
        overrides["cloud_above"] = args.cloud_above
    if args.topology:
        setup = routing.RoutingSetup.from_topology(args.topology, **overrides)
    else:
        setup = routing.RoutingSetup(**overrides)
    engine = None
    if args.results:
        results = routing.match_results(prompts, load_results(args.results))
    else:
        engine = _load(args)
        results = _exits_to(None, engine, prompts, args.max_tokens or 48, False)
    made_with = results[0].max_tokens
    if args.max_tokens and made_with and args.max_tokens != made_with:
        raise InvalidRequest(
            f"--max-tokens {args.max_tokens} differs from the results' {made_with}: escalation"
            " runs would not be comparable"
        )
    max_tokens = made_with or args.max_tokens or 48
    scorers = {"heuristic": routing.score_prompts(routing.load_scorer("heuristic"), prompts)}
    if args.scorer:
        scorers["learned"] = routing.score_prompts(
            routing.load_scorer("learned", args.scorer), prompts
        )
    runs = None
    if not args.no_escalation:
        engine = engine or _load(args)
        fingerprint = results[0].fingerprint
        if fingerprint is not None and fingerprint != engine.fingerprint:
            raise ModelMismatch(
                f"results were made with model {fingerprint}, --model is"
                f" {engine.fingerprint}: escalation runs would not be comparable"
            )
        runs = _escalation_runs(args, engine, prompts, max_tokens, setup.escalation)
    features = args.features or (
        Path(args.results).with_suffix(".features.npz") if args.results else None
    )
    gate = gate_eval(results, prompts, features, args.probes, args.topology)
    if gate is None and args.topology:
        print(
            f"no first-token features ({features or 'none without --results'}): no default or "
            "gate policies; `ruyiflow eval exits --features` writes them",
            file=sys.stderr,
        )
    curves = routing.policy_curves(results, scorers, runs, setup, gate)
    rows = summarise_curves(curves, args.quality)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        _print_exit_summary(results, sys.stdout)
        print()
        print(format_table(rows))
        if gate is not None:
            print("\n".join(["", *default_lines(curves, gate)]))
    if args.plot:
        _plot(curves, args.quality, args.plot, quiet=args.json)
    return 0


def _escalation_runs(args, engine, prompts, max_tokens: int, settings) -> dict:
    from ruyiflow.evaluation.runner import load_runs, run_escalation, save_runs

    meta = {
        "fingerprint": engine.fingerprint,
        "max_tokens": max_tokens,
        "window": settings.window,
        "threshold": settings.threshold,
        "prompts": sorted(p.id for p in prompts),
    }
    if args.escalation_cache:
        runs = load_runs(args.escalation_cache, meta)
        if runs is not None:
            print(f"escalation runs from {args.escalation_cache}", file=sys.stderr)
            return runs
    runs = run_escalation(engine, prompts, max_tokens, settings)
    if args.escalation_cache:
        save_runs(args.escalation_cache, runs, meta)
    return runs


def _plot(curves, quality: str, path: str, quiet: bool) -> None:
    from ruyiflow.evaluation.plot import line_plot, write_png
    from ruyiflow.evaluation.policies import frontier

    series = [
        (c.name, [(p.compute, p.quality(quality)) for p in frontier(c.points, quality, "compute")])
        for c in curves
    ]
    write_png(path, line_plot(series, "compute (relative to always-deepest)", quality))
    if not quiet:
        print(f"\nplot: {path}")
