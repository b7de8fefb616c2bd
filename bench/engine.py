"""`ruyiflow bench engine`: decode speed of the engine on the embedded SmolLM2-135M, each figure
a ratio against a baseline measured in the same run (transformers `generate` on the same weights,
the memory-bandwidth bound, single stream, the last exit, re-prefilling).

The table and the JSON name the CPU GEMV path that ran (`kernels.cpu_gemv.active_path()`);
`RUYIFLOW_CPU_GEMV=avx2` (or `avx512`, `plain`, `off`) forces one."""

from __future__ import annotations

import argparse
import json
import time

import torch

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.kernels import cpu_gemv

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690, 17, 45]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    p.add_argument("--context", type=int, default=512, help="context for the branch-switch figure")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--json", action="store_true")


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s this machine streams from memory: the best of `repeats` sums over a buffer far
    larger than the caches (the bound of `bench engine` and `bench moe`)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes(model, exit_layer: int) -> int:
    """Bytes of weights one decode token reads at an exit (the bandwidth bound's numerator)."""
    return model.branch_parameters(exit_layer) * model.embed.element_size()


def decode_rate(engine: Engine, n: int, exit_layer: int, batch: int = 1) -> float:
    """Aggregate decode tokens/s over `batch` concurrent greedy streams (prefill excluded)."""
    ids = [
        engine.add_request(
            [*PROMPT, i], SamplingParams(max_tokens=n + 1, ignore_eos=True), exit_layer
        )
        for i in range(batch)
    ]
    engine.step()  # prefill + first token
    t = time.perf_counter()
    count = 0
    while engine.has_work():
        count += len(engine.step())
    elapsed = time.perf_counter() - t
    assert not any(i in engine.sequences for i in ids)
    return count / elapsed


def transformers_rate(loaded, n: int) -> float:
    """transformers `generate` (greedy, KV cache) decode tokens/s on the same float32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c, m = loaded.config, loaded.model
    cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope.theta,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=True,
    )
    hf = LlamaForCausalLM(cfg).eval()
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(m.embed)
        hf.model.norm.weight.copy_(m.branches[c.last_exit].norm)
        for layer, ours in zip(hf.model.layers, m.layers, strict=True):
            a = layer.self_attn
            a.q_proj.weight.copy_(ours.w_qkv[:q])
            a.k_proj.weight.copy_(ours.w_qkv[q : q + kv])
            a.v_proj.weight.copy_(ours.w_qkv[q + kv :])
            a.o_proj.weight.copy_(ours.w_o)
            inter = c.intermediate_size
            layer.mlp.gate_proj.weight.copy_(ours.w_gate_up[:inter])
            layer.mlp.up_proj.weight.copy_(ours.w_gate_up[inter:])
            layer.mlp.down_proj.weight.copy_(ours.w_down)
            layer.input_layernorm.weight.copy_(ours.input_norm)
            layer.post_attention_layernorm.weight.copy_(ours.post_norm)
    ids = torch.tensor([PROMPT])

    def timed(new: int) -> float:
        t = time.perf_counter()
        hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        return time.perf_counter() - t

    timed(4)
    return (n - 1) / (timed(n) - timed(1))


def switch_vs_prefill(loaded, context: int) -> tuple[float, float]:
    """Seconds to move a sequence from exit 12 to the last exit at `context` tokens: our
    branch switch vs re-prefilling the deep branch from tokens."""
    from ruyiflow.engine.model import Work

    model, last = loaded.model, loaded.config.last_exit
    shallow = loaded.config.exits[0]
    ids = [(7 * i) % 4000 + 10 for i in range(context)]
    best_switch = best_prefill = float("inf")
    for _ in range(3):
        cache = model.new_cache()
        model.forward([Work(cache, ids, 0, shallow)])
        t = time.perf_counter()
        model.switch_exit(cache, shallow, last)
        best_switch = min(best_switch, time.perf_counter() - t)
        t = time.perf_counter()
        model.forward([Work(model.new_cache(), ids, 0, last)])
        best_prefill = min(best_prefill, time.perf_counter() - t)
    return best_switch, best_prefill


def run(args: argparse.Namespace) -> int:
    n = args.tokens
    gemv = cpu_gemv.active_path()  # builds the kernel (or raises for a path the CPU lacks) first
    bandwidth = memory_bandwidth()
    f32 = load_model("smollm2", "float32")
    bf16 = load_model("smollm2", "bfloat16")
    last = f32.config.last_exit
    rows = []
    ours = decode_rate(Engine(f32), n, last)
    bound = bandwidth / weight_bytes(f32.model, last)
    hf = None if args.skip_transformers else transformers_rate(f32, n)
    rows.append(("single stream f32 (tok/s)", ours, "transformers generate f32", hf))
    rows.append(("single stream f32 (tok/s)", ours, "f32 bandwidth bound", bound))
    cpu_gemv.set_threads(2)  # a machine this process has to itself (see kernels/cpu_gemv.py)
    ours2 = decode_rate(Engine(f32), n, last)
    bf16_2 = decode_rate(Engine(bf16), n, last)
    cpu_gemv.set_threads(1)
    rows.append(("single stream f32, GEMV 2 threads", ours2, "transformers generate f32", hf))
    rows.append(("single stream f32, GEMV 2 threads", ours2, "f32 bandwidth bound", bound))
    ours_bf16 = decode_rate(Engine(bf16), n, last)
    rows.append(
        (
            "single stream bf16 (tok/s)",
            ours_bf16,
            "bf16 bandwidth bound",
            bandwidth / weight_bytes(bf16.model, last),
        )
    )
    rows.append(("single stream bf16 (tok/s)", ours_bf16, "transformers generate f32", hf))
    rows.append(
        (
            "single stream bf16, GEMV 2 threads",
            bf16_2,
            "bf16 bandwidth bound",
            bandwidth / weight_bytes(bf16.model, last),
        )
    )
    rows.append(("single stream bf16, GEMV 2 threads", bf16_2, "transformers generate f32", hf))
    batch8 = decode_rate(Engine(f32, max_batch=8), n, last, batch=8)
    rows.append(("batch-8 aggregate f32 (tok/s)", batch8, "single stream f32", ours))
    for e in f32.config.exits[:-1]:
        rate = decode_rate(Engine(f32), n, e)
        rows.append(
            (
                f"exit {e} f32 (tok/s)",
                rate,
                f"exit {last}; depth ratio {(last + 1) / (e + 1):.2f}",
                ours,
            )
        )
    switch_s, prefill_s = switch_vs_prefill(f32, args.context)
    rows.append(
        (
            f"switch 12->{last} at {args.context} ctx (1/s)",
            1 / switch_s,
            f"re-prefill exit {last} from tokens",
            1 / prefill_s,
        )
    )
    report = [
        {
            "figure": f,
            "ours": round(o, 2),
            "baseline": b,
            "baseline_value": None if v is None else round(v, 2),
            "ratio": None if v is None else round(o / v, 3),
        }
        for f, o, b, v in rows
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "bandwidth_gb_s": round(bandwidth / 1e9, 2),
                    "threads": torch.get_num_threads(),
                    "gemv_path": gemv,
                    "rows": report,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, {torch.get_num_threads()} torch threads, "
        f"GEMV path {gemv}, 1 thread unless noted, {n} decode tokens per figure"
    )
    print(f"{'figure':<38} {'ours':>9}  {'baseline':<44} {'value':>9} {'ratio':>7}")
    for r in report:
        value = "-" if r["baseline_value"] is None else f"{r['baseline_value']:.2f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        print(f"{r['figure']:<38} {r['ours']:>9.2f}  {r['baseline']:<44} {value:>9} {ratio:>7}")
    return 0
