"""`ruyiflow bench engine`: decode speed of the engine on the embedded SmolLM2-135M, each figure
a ratio against a baseline measured in the same run (transformers `generate` on the same weights,
the memory-bandwidth bound, single stream, the last exit, re-prefilling).

The table and the JSON name the CPU GEMV path that ran (`kernels.cpu_gemv.active_path()`);
`RUYIFLOW_CPU_GEMV=avx2` (or `avx512`, `plain`, `off`) forces one. They also give what one position
costs in the paged KV pool (K/V of every layer run plus the exits' boundary states) and the pool's
occupancy at 8 and 64 concurrent sequences: pages held as a share of the pool, and the share of
the held pages' bytes that hold positions (the rest is the unfilled tail of each sequence's last
page per slot). On the CPU, decode attention through the C paged kernel (`kernels.cpu_attention`) is
compared with attention per sequence over block views, the two alternating step by step in one
engine (median step; the machine's noise moves both alike). `--device cuda` runs both sides on a
CUDA device (`bench gpu` is the full check)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.kernels import cpu_attention, cpu_gemv

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690, 17, 45]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    p.add_argument("--context", type=int, default=512, help="context for the branch-switch figure")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides run there)")
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


def start_streams(
    engine: Engine, n: int, exit_layer: int, batch: int, prompt: list[int] = PROMPT
) -> list[str]:
    """Queue `batch` greedy streams of n + 1 tokens (prompt + [i] each) and run their prefills
    and first tokens (one step, not timed); returns their ids."""
    params = SamplingParams(max_tokens=n + 1, ignore_eos=True)
    ids = [engine.add_request([*prompt, i], params, exit_layer) for i in range(batch)]
    engine.step()  # prefill + first token
    return ids


def decode_rate(
    engine: Engine, n: int, exit_layer: int, batch: int = 1, pages: list[int] | None = None
) -> float:
    """Aggregate decode tokens/s over `batch` concurrent greedy streams (prefill excluded);
    `pages` gets the most KV pages the pool had taken at once."""
    ids = start_streams(engine, n, exit_layer, batch)
    allocator = engine.scheduler.allocator
    most = allocator.num_used if allocator else 0
    t = time.perf_counter()
    count = 0
    while engine.has_work():
        count += len(engine.step())
        most = max(most, allocator.num_used) if allocator else 0
    elapsed = time.perf_counter() - t
    if pages is not None:
        pages.append(most)
    assert not any(i in engine.sequences for i in ids)
    return count / elapsed


def attention_rates(
    loaded, exit_layer: int, batch: int, n: int, prompt: list[int] = PROMPT
) -> tuple[float, float]:
    """Aggregate decode tokens/s of `batch` streams with the C paged attention and with attention
    per sequence (`RUYIFLOW_CPU_ATTENTION=off`), alternating step by step in one engine: from
    each side's median step."""
    engine = Engine(loaded, max_batch=batch)
    start_streams(engine, n, exit_layer, batch, prompt)
    times: dict[str, list[float]] = {"auto": [], "off": []}
    saved = os.environ.get(cpu_attention.ENV_SWITCH)
    try:
        while engine.has_work():
            side = ("auto", "off")[len(times["auto"]) > len(times["off"])]
            os.environ[cpu_attention.ENV_SWITCH] = side
            t = time.perf_counter()
            engine.step()
            times[side].append(time.perf_counter() - t)
    finally:
        if saved is None:
            os.environ.pop(cpu_attention.ENV_SWITCH, None)
        else:
            os.environ[cpu_attention.ENV_SWITCH] = saved
    return batch / statistics.median(times["auto"]), batch / statistics.median(times["off"])


def transformers_rate(loaded, n: int) -> float:
    """transformers `generate` (greedy, KV cache) decode tokens/s on the same float32 weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ruyiflow.bench.gpu_figures import timed_generate

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
    hf = hf.to(m.device)
    ids = torch.tensor([PROMPT], device=m.device)

    def timed(new: int) -> float:
        return timed_generate(hf, ids, new)[0]

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
    f32 = load_model("smollm2", "float32", device=args.device)
    bf16 = load_model("smollm2", "bfloat16", device=args.device)
    if f32.model.device.type == "cuda":
        from ruyiflow.bench.gpu_figures import copy_bandwidth

        bandwidth = copy_bandwidth(f32.model.device)
    else:
        bandwidth = memory_bandwidth()
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
    held: list[int] = []
    batch8 = decode_rate(Engine(f32, max_batch=8), n, last, batch=8, pages=held)
    rows.append(("batch-8 aggregate f32 (tok/s)", batch8, "single stream f32", ours))
    batch64 = decode_rate(Engine(f32, max_batch=64), n, last, batch=64, pages=held)
    rows.append(("batch-64 aggregate f32 (tok/s)", batch64, "single stream f32", ours))
    if f32.model.device.type == "cpu" and cpu_attention.is_available():
        for batch in (8, 32):
            c_rate, items_rate = attention_rates(f32, last, batch, n)
            rows.append(
                (
                    f"batch-{batch} f32, C paged attention",
                    c_rate,
                    "attention per sequence, alternate steps",
                    items_rate,
                )
            )
    pool = pool_figures(f32, last, len(PROMPT) + 1 + n, dict(zip((8, 64), held, strict=True)))
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
                    "device": args.device,
                    "kv_pool": pool,
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
    print(
        f"KV pool (f32, exit {last}): {pool['bytes_per_token']:,} bytes per position "
        f"({pool['kv_bytes_per_token']:,} K/V + {pool['boundary_bytes_per_token']:,} boundary "
        f"states), {pool['num_pages']:,} pages of {pool['block_size']} positions "
        f"({pool['pool_mib']:.0f} MiB)"
    )
    for o in pool["occupancy"]:
        print(
            f"  {o['sequences']:>3} sequences of {o['positions']} positions: "
            f"{o['pages_held']:,} pages held ({o['pool_share']:.1%} of the pool), "
            f"{o['fill']:.1%} of their bytes hold positions"
        )
    return 0


def pool_figures(loaded, exit_layer: int, positions: int, held: dict[int, int]) -> dict:
    """What a position costs in the engine's paged pool at `exit_layer`, and the pool's
    occupancy with `held[count]` pages taken by `count` sequences of `positions` positions."""
    from ruyiflow.engine.torch_runner import TorchRunner

    runner = TorchRunner(loaded)
    pool, layout = runner.pool, runner.pool.layout
    geometry, elem = pool.geometry, pool.pages.element_size()
    total = geometry.elems_per_token(layout, exit_layer) * elem
    boundary = sum(1 for s in layout.slots_for(exit_layer) if layout.is_boundary(s))
    boundary_bytes = boundary * geometry.hidden_size * elem
    occupancy = [
        {
            "sequences": count,
            "positions": positions,
            "pages_held": pages,
            "pool_share": pages / pool.allocator.num_blocks,
            "fill": count * positions * total / (pages * pool.page_bytes),
        }
        for count, pages in held.items()
    ]
    return {
        "bytes_per_token": total,
        "kv_bytes_per_token": total - boundary_bytes,
        "boundary_bytes_per_token": boundary_bytes,
        "block_size": pool.block_size,
        "num_pages": pool.allocator.num_blocks,
        "pool_mib": pool.allocator.num_blocks * pool.page_bytes / 2**20,
        "occupancy": occupancy,
    }
