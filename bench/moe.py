"""`ruyiflow bench moe`: CPU decode tokens/s of a small random MoE model per family, our Engine vs
transformers `generate` on the same weights, measured in the same run (target ratio >= 3x).

Each family gets a config of the same size (default hidden 512, 8 layers, 32 experts, top-4,
float32), built with transformers' own class, saved with `save_pretrained` and loaded back through
our loader, so both sides run identical weights. Greedy, single stream, prefill excluded; the two
sides' greedy tokens are compared as a sanity check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

PROMPT = [11, 5, 201, 37, 99, 143, 7, 62, 18, 250, 3, 71]
FAMILIES = ("hunyuan_v1_moe", "dots1", "deepseek_v3")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families")
    p.add_argument("--tokens", type=int, default=32, help="decode tokens per measurement")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-size", type=int, default=256, help="one expert's intermediate width")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per side")
    p.add_argument("--json", action="store_true")


def hf_config(family: str, a: argparse.Namespace):
    """A transformers config of `family` at the benchmark size."""
    from transformers import DeepseekV3Config, Dots1Config, HunYuanMoEV1Config

    heads = a.hidden // 64
    common = dict(
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        num_hidden_layers=a.layers,
        num_attention_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if family == "hunyuan_v1_moe":  # expert and shared widths are both intermediate_size here
        return HunYuanMoEV1Config(
            **common,
            num_key_value_heads=max(heads // 4, 1),
            head_dim=64,
            intermediate_size=a.expert_size,
            num_experts=a.experts,
            moe_topk=a.top_k,
            rope_parameters={
                "rope_type": "dynamic",
                "alpha": 1000.0,
                "factor": 1.0,
                "rope_theta": 10000.0,
            },
        )
    moe = dict(
        intermediate_size=4 * a.hidden,
        moe_intermediate_size=a.expert_size,
        n_routed_experts=a.experts,
        num_experts_per_tok=a.top_k,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
    )
    if family == "dots1":
        return Dots1Config(
            **common,
            **moe,
            num_key_value_heads=heads,
            head_dim=64,
            n_shared_experts=2,
            sliding_window=None,
        )
    return DeepseekV3Config(
        **common,
        **moe,
        num_key_value_heads=heads,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        q_lora_rank=a.hidden // 2,
        kv_lora_rank=a.hidden // 4,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        num_nextn_predict_layers=0,
    )


def write_tokenizer(path: Path) -> None:
    """A byte-level tokenizer.json so the checkpoint directory loads like a real one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))


def ours_rate(loaded, n: int) -> tuple[float, list[int]]:
    """Engine decode tokens/s (greedy, one stream, first token = prefill excluded)."""
    from ruyiflow.engine.engine import Engine
    from ruyiflow.engine.sampling import SamplingParams

    engine = Engine(loaded, max_batch=1)
    engine.add_request(PROMPT, SamplingParams(max_tokens=n + 1, ignore_eos=True))
    tokens = [e.token_id for e in engine.step()]  # prefill + first token
    started = time.perf_counter()
    while engine.has_work():
        tokens += [e.token_id for e in engine.step()]
    return n / (time.perf_counter() - started), tokens


def transformers_rate(model, n: int) -> tuple[float, list[int]]:
    """transformers `generate` decode tokens/s: (time of n+1 new tokens - time of 1) / n."""
    from ruyiflow.bench.gpu_figures import timed_generate

    ids = torch.tensor([PROMPT])
    t_full, tokens = timed_generate(model, ids, n + 1)
    t_one, _ = timed_generate(model, ids, 1)
    return n / (t_full - t_one), tokens


def bench_family(family: str, a: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    from ruyiflow.engine.checkpoint import load_model

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config(family, a), dtype=torch.float32).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        write_tokenizer(Path(tmp))
        loaded = load_model(tmp, "float32")
    c, m = loaded.config, loaded.model
    ours = theirs = 0.0
    with torch.inference_mode():
        transformers_rate(hf, 2)  # warm-up
        for _ in range(a.repeats):  # alternate the sides: a busy moment hits both alike
            rate, our_tokens = ours_rate(loaded, a.tokens)
            ours = max(ours, rate)
            rate, hf_tokens = transformers_rate(hf, a.tokens)
            theirs = max(theirs, rate)
    # weights one decode token streams: all it touches but the embedding (one row is read)
    token_bytes = (m.branch_parameters(c.last_exit) - m.embed.numel()) * m.embed.element_size()
    return {
        "family": family,
        "parameters": m.num_parameters(),
        "active_parameters": m.branch_parameters(c.last_exit),
        "kv_bytes_per_token": m.kv_bytes_per_token(),
        "bound_tokens_per_s": a.bandwidth / token_bytes,
        "ours_tokens_per_s": ours,
        "transformers_tokens_per_s": theirs,
        "ratio": ours / theirs,
        "same_greedy_tokens": our_tokens == hf_tokens,
        "transformers_experts": hf.config._experts_implementation,
    }


def run(args: argparse.Namespace) -> int:
    from ruyiflow.bench.engine import memory_bandwidth
    from ruyiflow.kernels import cpu_gemv

    args.bandwidth = memory_bandwidth()
    rows = [bench_family(f.strip(), args) for f in args.families.split(",") if f.strip()]
    if args.json:
        print(json.dumps({"gemv_path": cpu_gemv.active_path(), "rows": rows}, indent=2))
        return 0
    print(
        f"MoE decode on CPU ({torch.get_num_threads()} threads), float32, hidden {args.hidden}, "
        f"{args.layers} layers, {args.experts} experts top-{args.top_k}, expert width "
        f"{args.expert_size}, vocab {args.vocab}, {args.tokens} tokens, best of {args.repeats}; "
        f"CPU GEMV path {cpu_gemv.active_path()}"
    )
    print(
        f"{'family':<16} {'params':>8} {'active':>8} {'KV B/tok':>9} {'bound':>7} "
        f"{'ours tok/s':>11} {'HF tok/s':>9} {'ratio':>6}  same tokens"
    )
    for r in rows:
        print(
            f"{r['family']:<16} {r['parameters'] / 1e6:>7.1f}M "
            f"{r['active_parameters'] / 1e6:>7.1f}M "
            f"{r['kv_bytes_per_token']:>9,} {r['bound_tokens_per_s']:>7.0f} "
            f"{r['ours_tokens_per_s']:>11.1f} "
            f"{r['transformers_tokens_per_s']:>9.1f} {r['ratio']:>5.2f}x  "
            f"{r['same_greedy_tokens']}"
        )
    print(
        f"baseline: transformers generate (experts implementation "
        f"{rows[0]['transformers_experts'] if rows else '?'}) on the same weights, same process; "
        f"bound: {args.bandwidth / 1e9:.1f} GB/s over the weights one token reads"
    )
    return 0
