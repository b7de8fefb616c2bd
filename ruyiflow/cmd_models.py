"""`ruyiflow models`: family, layers, exits, parameters per branch, KV bytes, fingerprint."""

from __future__ import annotations

import argparse
import json

from ruyiflow.cmd_generate import add_device_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", nargs="?", default="smollm2", help="model dir, .gguf file, or 'smollm2'"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--extra-exits", default=None, help="comma-separated exits for a plain model")
    add_device_argument(p)
    p.add_argument("--json", action="store_true")


def describe(loaded) -> dict:
    c, m = loaded.config, loaded.model
    elem = m.embed.element_size()
    kv_per_layer = 2 * c.num_kv_heads * c.head_dim * elem
    # models that know their cache layout (MoE; MLA caches a latent, not K/V) say so themselves
    kv_model = m.kv_bytes_per_token() if hasattr(m, "kv_bytes_per_token") else None
    # what a position costs in the served paged cache: K/V (or latents) and boundary states
    layout, geometry = m.page_layout(16), m.page_geometry(16)
    return {
        "model": loaded.name,
        "family": c.family,
        "layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "exits": list(c.exits),
        "default_exit": c.default_exit,
        "dtype": str(m.dtype).removeprefix("torch."),
        "device": str(m.device),
        "fingerprint": loaded.fingerprint,
        "branches": [
            {
                "exit": e,
                "depth": e + 1,
                "parameters": m.branch_parameters(e),
                # trunk layers 0..e-1 plus the branch layer
                "kv_bytes_per_token": kv_model if kv_model is not None else (e + 1) * kv_per_layer,
                "cache_bytes_per_token": geometry.elems_per_token(layout, e) * elem,
            }
            for e in c.exits
        ],
    }


def run(args: argparse.Namespace) -> int:
    from ruyiflow.cmd_generate import parse_ids
    from ruyiflow.engine.checkpoint import load_model

    extra = parse_ids(args.extra_exits) if args.extra_exits else None
    info = describe(load_model(args.model, args.dtype, extra, device=args.device))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {info['model']}")
    print(f"family       {info['family']}  ({info['layers']} layers, hidden {info['hidden_size']})")
    print(f"exits        {info['exits']}  (default {info['default_exit']})")
    print(f"dtype        {info['dtype']} on {info['device']}")
    print(f"fingerprint  {info['fingerprint']}")
    print(f"{'exit':>6} {'depth':>6} {'parameters':>14} {'KV bytes/token':>15} {'cache':>10}")
    for b in info["branches"]:
        print(
            f"{b['exit']:>6} {b['depth']:>6} {b['parameters']:>14,} {b['kv_bytes_per_token']:>15,}"
            f" {b['cache_bytes_per_token']:>10,}"
        )
    print("(cache: bytes a position takes in the paged pool, with the exits' boundary states)")
    return 0
