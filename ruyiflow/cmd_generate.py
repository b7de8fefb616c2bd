"""`ruyiflow generate`: local generation with the engine, streamed, then tokens/s."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ruyiflow.engine.errors import InvalidRequest


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="cpu", help="where weights, KV cache and compute run: cpu, cuda, cuda:N"
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2", help="model dir, .gguf file, or 'smollm2' (default)"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_device_argument(p)
    p.add_argument(
        "--extra-exits",
        default=None,
        help="comma-separated exits to add to a plain model (smollm2: 12,16,20,24)",
    )
    p.add_argument(
        "--overlay",
        default="default",
        help="trained exit branches: 'default' (smollm2's shipped overlay), 'none', or a file",
    )


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument(
        "--exit", type=int, default=None, help="exit layer (default: the model's default)"
    )
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument(
        "--prompt-ids", default=None, help="comma-separated prompt token ids, used as given"
    )
    p.add_argument("--system", default=None, help="system message for the chat template")
    p.add_argument(
        "--thinking", choices=["on", "off"], default=None, help="enable_thinking for templates"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.add_argument(
        "--backend",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="torch (the checkpoint) or onnxruntime (an export: --onnx DIR)",
    )
    p.add_argument(
        "--onnx", default=None, help="onnxruntime: an export dir from `ruyiflow export-onnx`"
    )
    p.add_argument(
        "--providers", default=None, help="onnxruntime execution providers, comma-separated"
    )
    p.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="replay decode steps as CUDA graphs (needs --device cuda; off by default until "
        "`ruyiflow bench gpu` has verified them on a device)",
    )
    p.add_argument("prompt", nargs="?", default=None)


def parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise InvalidRequest(f"--prompt-ids must be comma-separated integers ({exc})") from exc


def sampling_from_args(args: argparse.Namespace):
    from ruyiflow.engine.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram,
        stop=tuple(args.stop),
        seed=args.seed,
    )


def load_from_args(args: argparse.Namespace):
    from ruyiflow.engine.checkpoint import load_model

    extra = parse_ids(args.extra_exits) if args.extra_exits else None
    return load_model(args.model, args.dtype, extra, overlay=args.overlay, device=args.device)


def prompt_ids_from_args(args: argparse.Namespace, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        return parse_ids(args.prompt_ids)
    if args.prompt is None:
        raise InvalidRequest("give a PROMPT or --prompt-ids")
    if args.raw:
        return tokenizer.encode(args.prompt)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    thinking = None if args.thinking is None else args.thinking == "on"
    return tokenizer.encode(tokenizer.apply_chat_template(messages, enable_thinking=thinking))


def engine_from_args(args: argparse.Namespace):
    """(engine, tokenizer) for the chosen backend; onnxruntime needs neither torch nor the
    checkpoint, only the export."""
    if args.backend == "onnxruntime":
        from ruyiflow.engine.ort_engine import open_export

        if not args.onnx:
            raise InvalidRequest("--backend onnxruntime needs --onnx DIR (see export-onnx)")
        if args.device != "cpu" or args.cuda_graphs:
            raise InvalidRequest(
                "--device and --cuda-graphs are the torch backend's; onnxruntime uses --providers"
            )
        providers = [p for p in (args.providers or "").split(",") if p]
        engine = open_export(args.onnx, providers, max_batch=1)
        return engine, engine.tokenizer
    if args.onnx or args.providers:
        raise InvalidRequest("--onnx and --providers need --backend onnxruntime")
    # (onnxruntime picks its device through --providers; --device is the torch runner's)
    from ruyiflow.engine.cuda_graphs import GraphConfig
    from ruyiflow.engine.engine import Engine
    from ruyiflow.engine.torch_runner import TorchRunner

    loaded = load_from_args(args)
    graphs = GraphConfig(enabled=args.cuda_graphs)
    return Engine(TorchRunner(loaded, graphs=graphs), max_batch=1), loaded.tokenizer


def run(args: argparse.Namespace) -> int:
    engine, tokenizer = engine_from_args(args)
    prompt_ids = prompt_ids_from_args(args, tokenizer)
    params = sampling_from_args(args)
    exit_layer = engine.config.default_exit if args.exit is None else args.exit
    started = time.perf_counter()
    first = None
    tokens, confidence, text, reason = [], [], [], None
    for event in engine.generate(prompt_ids, params, exit_layer):
        first = first or time.perf_counter()
        tokens.append(event.token_id)
        confidence.append(vars(event.confidence))
        text.append(event.text)
        reason = event.finish_reason
        if not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    done = time.perf_counter()
    decode_rate = (len(tokens) - 1) / (done - first) if len(tokens) > 1 else 0.0
    if args.json:
        print(
            json.dumps(
                {
                    "text": "".join(text),
                    "prompt_token_ids": prompt_ids,
                    "token_ids": tokens,
                    "exit": exit_layer,
                    "finish_reason": reason,
                    "confidence": confidence,
                    "fingerprint": engine.fingerprint,
                    "time_to_first_token_s": round(first - started, 4),
                    "decode_tokens_per_s": round(decode_rate, 2),
                }
            )
        )
    else:
        print()
        print(
            f"[{len(tokens)} tokens, exit {exit_layer}, first token {first - started:.3f}s, "
            f"decode {decode_rate:.1f} tokens/s, finish: {reason}]",
            file=sys.stderr,
        )
    return 0
