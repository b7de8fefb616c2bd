"""`ruyiflow bench edge`: the edge tier on ONNX Runtime, on the embedded SmolLM2-135M.

In one run: single-stream and batch-4 decode tokens/s of each exit asked for, ONNX Runtime float32,
int8 and int4 exports against our torch engine in float32 (the baseline of each row); llama.cpp
(`llama-cpp-python`, a bench-only dependency) decoding the same GGUF file (Q4_1) single-stream as
the edge-CPU anchor; and the greedy-token agreement of the quantized exports with the float32 one
over `--agreement-tokens` tokens on `--prompts` prompts of the shipped held-out set, both
free-running (position by position: one early divergence shifts the rest) and along float32's
greedy path (each position's argmax given the same prefix), with the quantized form each export
records and the CPU features it ran on (ONNX Runtime's int8 kernels differ with and without
AVX-512 VNNI). Exports are cached under ~/.cache/ruyiflow/bench-edge and re-made when the model
or the quantizer's settings change.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from ruyiflow.bench.engine import decode_rate
from ruyiflow.engine.checkpoint import embedded_gguf_path, load_model
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.ort_engine import open_export
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.onnx_exports import ensure_export

QUANTS = ("float32", "int8", "int4")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exits", default="12,16,20,24,29", help="comma-separated exits")
    p.add_argument("--quants", default=",".join(QUANTS), help="comma-separated ORT variants")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    p.add_argument("--prompts", type=int, default=20, help="prompts for the agreement figure")
    p.add_argument("--agreement-tokens", type=int, default=256)
    p.add_argument(
        "--agreement-exits", default="29", help="exits whose quantized agreement is measured"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for every side (torch, ONNX Runtime, llama.cpp); 1 is robust on a shared VM",
    )
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--json", action="store_true")


def cached_export(loaded, exit_layer: int, quant: str) -> Path:
    """An export of `exit_layer` in `quant`, made once per model fingerprint and quantizer
    settings (an int8 export cached before int8 moved to MatMulNBits is re-made)."""
    from ruyiflow.export.quantize import quant_details

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = cache / "ruyiflow" / "bench-edge" / f"exit-{exit_layer}-{quant}"
    if quant != "float32" and recorded_form(path) != quant_details(quant):
        (path / "manifest.json").unlink(missing_ok=True)  # no manifest: ensure_export re-makes
    ensure_export(loaded, exit_layer, path, quant=None if quant == "float32" else quant)
    return path


def recorded_form(path: Path) -> dict | None:
    """The quantization settings an export's manifest records (None: no readable manifest)."""
    try:
        return json.loads((path / "manifest.json").read_text())["quant_details"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def form_name(details: dict | None) -> str:
    if not details:
        return "unknown"
    return (
        f"{details['method']} {details['bits']}-bit, block {details['block_size']},"
        f" accuracy level {details['accuracy_level']}"
    )


def cpu_features() -> str:
    """The machine and the SIMD features ONNX Runtime's int8 kernels choose by, as cpuid reports
    them to this process (numpy's dispatch table): right under `qemu-x86_64 -cpu Haswell` too,
    whose /proc/cpuinfo shows the host's."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    names = ("AVX2", "FMA3", "AVX512F", "AVX512BW", "AVX512VNNI", "ASIMD", "ASIMDDP", "SVE")
    return f"{platform.machine()}: {' '.join(n for n in names if features.get(n))}"


def llama_cpp_rate(n: int, threads: int) -> float:
    """llama.cpp single-stream decode tokens/s on the shipped GGUF (prefill excluded)."""
    from llama_cpp import Llama

    from ruyiflow.bench.engine import PROMPT

    llm = Llama(
        model_path=str(embedded_gguf_path()),
        n_ctx=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    best = 0.0
    for _ in range(2):
        llm.reset()
        stream = llm.generate(PROMPT, temp=0.0, top_k=1, reset=True)
        next(stream)  # prefill + first token
        started = time.perf_counter()
        for _ in range(n):
            next(stream)
        best = max(best, n / (time.perf_counter() - started))
    return best


def held_out_prompts(tokenizer, count: int) -> list[list[int]]:
    from ruyiflow.evaluation.prompts import HELDOUT_PROMPTS, load_prompts

    prompts = load_prompts(HELDOUT_PROMPTS)[:count]
    return [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}]))
        for p in prompts
    ]


def greedy_tokens(engine, prompts: list[list[int]], exit_layer: int, n: int) -> list[list[int]]:
    """Greedy continuations of every prompt (batched), `n` tokens each."""
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    ids = [engine.add_request(p, params, exit_layer) for p in prompts]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for event in engine.step():
            out[event.seq_id].append(event.token_id)
    return [out[i] for i in ids]


def forced_argmax(branch, prompt: list[int], forced: list[int]) -> list[int]:
    """The branch's argmax at each position of `forced` (float32's greedy continuation) when fed
    that continuation: agreement along the same path, not after a first divergence."""
    import numpy as np

    n = len(prompt)
    logits, _, past = branch.run(
        np.array([prompt]), np.arange(n)[None], np.ones((1, n), np.int64), branch.empty_past(1)
    )
    out = [int(logits[0].argmax())]
    for i, token in enumerate(forced[:-1]):
        pos = n + i
        logits, _, past = branch.run(
            np.array([[token]]), np.array([[pos]]), np.ones((1, pos + 1), np.int64), past
        )
        out.append(int(logits[0].argmax()))
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions where two sets of continuations hold the same token."""
    same = sum(x == y for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    return same / sum(len(r) for r in a)


def run(args: argparse.Namespace) -> int:
    exits = [int(e) for e in args.exits.split(",")]
    quants = [q for q in args.quants.split(",") if q]
    unknown = set(quants) - set(QUANTS)
    if unknown:
        raise SystemExit(f"unknown quant(s) {sorted(unknown)}; choose from {QUANTS}")
    import torch

    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    torch_engine = Engine(loaded, max_batch=max(4, args.prompts))
    rows = []
    for exit_layer in exits:
        decode_rate(torch_engine, 4, exit_layer, 1)  # warm-up (allocator, kernels)
        base1 = decode_rate(torch_engine, args.tokens, exit_layer, 1)
        base4 = decode_rate(torch_engine, args.tokens, exit_layer, 4)
        row = {"exit": exit_layer, "torch_f32": base1, "torch_f32_batch4": base4}
        for quant in quants:
            engine = open_export(
                cached_export(loaded, exit_layer, quant), max_batch=4, threads=args.threads
            )
            decode_rate(engine, 4, exit_layer, 1)  # warm-up
            row[f"ort_{quant}"] = decode_rate(engine, args.tokens, exit_layer, 1)
            row[f"ort_{quant}_batch4"] = decode_rate(engine, args.tokens, exit_layer, 4)
        rows.append(row)
    llama = None if args.skip_llama_cpp else llama_cpp_rate(args.tokens, args.threads)
    agree, forms = {}, {}
    for exit_layer in [int(e) for e in args.agreement_exits.split(",") if e]:
        quantized = [q for q in quants if q != "float32"]
        if not quantized:
            break
        prompts = held_out_prompts(loaded.tokenizer, args.prompts)
        reference = greedy_tokens(
            open_export(
                cached_export(loaded, exit_layer, "float32"), max_batch=len(prompts), threads=None
            ),
            prompts,
            exit_layer,
            args.agreement_tokens,
        )
        for quant in quantized:
            path = cached_export(loaded, exit_layer, quant)
            forms[quant] = form_name(recorded_form(path))
            engine = open_export(path, max_batch=len(prompts))
            tokens = greedy_tokens(engine, prompts, exit_layer, args.agreement_tokens)
            agree[f"{quant}@{exit_layer} free-running"] = agreement(reference, tokens)
            branch = engine.runner.branches[exit_layer]  # the OnnxBranch under the engine
            forced = [forced_argmax(branch, p, r) for p, r in zip(prompts, reference, strict=True)]
            agree[f"{quant}@{exit_layer} along float32's path"] = agreement(reference, forced)
    result = {
        "rows": rows,
        "llama_cpp_tokens_per_s": llama,
        "agreement": agree,
        "quant_forms": forms,
        "cpu": cpu_features(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print_table(rows, quants, llama, agree, args)
    for quant, form in forms.items():
        print(f"{quant} export: {form}")
    print(f"cpu: {result['cpu']}")
    return 0


def print_table(rows, quants, llama, agree, args) -> None:
    print(f"decode tokens/s, {args.tokens} tokens, {args.threads} thread(s) per side")
    print("(x: vs torch float32, same exit and batch)")
    head = f"{'exit':>4} {'torch f32':>10}" + "".join(f" {'ort ' + q:>17}" for q in quants)
    for batch, suffix in ((1, ""), (4, "_batch4")):
        print(f"\nbatch {batch}\n{head}")
        for r in rows:
            base = r[f"torch_f32{suffix}"]
            cells = "".join(
                f" {r[f'ort_{q}{suffix}']:9.1f} ({r[f'ort_{q}{suffix}'] / base:4.2f}x)"
                for q in quants
            )
            print(f"{r['exit']:>4} {base:10.1f}{cells}")
    if llama:
        print(f"\nllama.cpp (same GGUF, Q4_1) single stream: {llama:.1f} tokens/s")
        last = max(rows, key=lambda r: r["exit"])
        for q in quants:
            print(f"  ort {q} at exit {last['exit']} / llama.cpp: {last[f'ort_{q}'] / llama:.2f}x")
    for key, value in agree.items():
        print(f"greedy agreement with float32, {key}: {value:.1%}")
