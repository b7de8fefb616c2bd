"""GPU benchmark: the Triton kernels against their torch references, in one run on one device.

    python -m bench.kernels_gpu [--small] [--peak-bandwidth 3.35e12] [--dtype bfloat16]

Tables (ratios against the torch reference, measured in this run; times are medians):
- fused MoE at 1, 16, 64 and 256 tokens, Hunyuan-A13B shape (E=64, k=8, H=4096, I=3072), with
  the achieved bandwidth = bytes of expert weights touched / time, as a fraction of the peak
  (default: H100 SXM HBM3, 3.35e12 B/s);
- routing (softmax top-8 of 64), RMSNorm + residual and exit confidence vs torch.
Prints a message and exits 0 when no CUDA device (or no Triton) is available. Never run by tests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

from ruyiflow import kernels
from ruyiflow.kernels.dispatch import has_triton

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels_gpu", description=__doc__)
    parser.add_argument("--small", action="store_true", help="E=16, k=4, H=1024, I=768")
    parser.add_argument("--peak-bandwidth", type=float, default=3.35e12, help="bytes/s")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--rep-ms", type=int, default=200, help="time budget per measurement")
    parser.add_argument("--device", default="cuda", help="a CUDA device, e.g. cuda:1")
    return parser.parse_args(argv)


def time_ms(fn: Callable[..., object], inputs: tuple[object, ...], rep_ms: int) -> float:
    """Median time of `fn(*inputs)` in ms, L2 flushed between runs (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(lambda: fn(*inputs), warmup=25, rep=rep_ms, return_mode="median"))


def measure(
    triton_fn: Callable[..., object],
    reference_fn: Callable[..., object],
    inputs: tuple[object, ...],
    rep_ms: int,
) -> tuple[float, float, float]:
    """(reference ms, triton ms, largest |difference| over all outputs)."""
    outs, refs = _as_tuple(triton_fn(*inputs)), _as_tuple(reference_fn(*inputs))
    diff = max(
        (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
        for a, b in zip(outs, refs, strict=True)
    )
    return time_ms(reference_fn, inputs, rep_ms), time_ms(triton_fn, inputs, rep_ms), diff


def _as_tuple(out: object) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)  # type: ignore[return-value]


def print_table(title: str, header: Sequence[str], rows: list[Sequence[object]]) -> None:
    cells = [list(map(str, header))] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def _moe_triton(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
) -> torch.Tensor:
    # validate_ids off: its device sync is not part of the kernel time being compared.
    return kernels.fused_moe_triton(x, w_gate_up, w_down, weights, ids, validate_ids=False)


def bench_fused_moe(args: argparse.Namespace, dtype: torch.dtype) -> None:
    num_experts, top_k, hidden, inter = (16, 4, 1024, 768) if args.small else (64, 8, 4096, 3072)
    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, device=dev, dtype=dtype, generator=gen)
    w_down = torch.randn(num_experts, hidden, inter, device=dev, dtype=dtype, generator=gen)
    w_gate_up.mul_(hidden**-0.5)
    w_down.mul_(inter**-0.5)
    bytes_per_expert = (w_gate_up[0].numel() + w_down[0].numel()) * w_gate_up.element_size()
    rows, route_rows = [], []
    for num_tokens in args.tokens:
        x = torch.randn(num_tokens, hidden, device=dev, dtype=dtype, generator=gen)
        logits = torch.randn(num_tokens, num_experts, device=dev, generator=gen)
        t_ref, t_tri, diff = measure(
            kernels.route_experts_triton,
            kernels.route_experts_reference,
            (logits, top_k),  # Hunyuan: softmax, renormalised, scale 1
            args.rep_ms,
        )
        route_rows.append([num_tokens, t_ref * 1e3, t_tri * 1e3, t_ref / t_tri, diff])
        weights, ids = kernels.route_experts(logits, top_k)
        inputs = (x, w_gate_up, w_down, weights, ids)
        t_ref, t_tri, diff = measure(_moe_triton, kernels.fused_moe_reference, inputs, args.rep_ms)
        num_touched = ids.unique().numel()
        bandwidth = num_touched * bytes_per_expert / (t_tri * 1e-3)  # B/s
        rows.append(
            [
                num_tokens,
                num_touched,
                t_ref * 1e3,
                t_tri * 1e3,
                t_ref / t_tri,
                bandwidth / 1e9,
                bandwidth / args.peak_bandwidth,
                diff,
            ]
        )
    shape = f"E={num_experts} k={top_k} H={hidden} I={inter} {args.dtype}"
    print_table(
        f"fused_moe, {shape} (baseline: fused_moe_reference, one matmul pair per active expert)",
        ["tokens", "experts", "ref us", "triton us", "speed-up", "GB/s", "of peak", "max diff"],
        rows,
    )
    print_table(
        f"route_experts, softmax top-{top_k} of {num_experts} (baseline: torch reference; "
        "diff covers weights and ids, ids may differ only in order)",
        ["tokens", "ref us", "triton us", "speed-up", "max diff"],
        route_rows,
    )


def bench_rmsnorm(args: argparse.Namespace, dtype: torch.dtype) -> None:
    hidden = 1024 if args.small else 4096
    weight = torch.randn(hidden, device=args.device, dtype=dtype)
    rows = []
    for num_tokens in (1, 16, 256, 4096):
        x = torch.randn(num_tokens, hidden, device=args.device, dtype=dtype)
        inputs = (x, weight, 1e-6, torch.randn_like(x))
        t_ref, t_tri, diff = measure(
            kernels.rmsnorm_triton, kernels.rmsnorm_reference, inputs, args.rep_ms
        )
        moved = 4 * x.numel() * x.element_size()  # read x and residual, write out and h
        rows.append(
            [
                num_tokens,
                t_ref * 1e3,
                t_tri * 1e3,
                t_ref / t_tri,
                moved / (t_tri * 1e-3) / args.peak_bandwidth,
                diff,
            ]
        )
    print_table(
        f"rms_norm + residual, H={hidden} {args.dtype} (baseline: torch reference, HF formula)",
        ["tokens", "ref us", "triton us", "speed-up", "of peak", "max diff"],
        rows,
    )


def bench_exit_confidence(args: argparse.Namespace, dtype: torch.dtype) -> None:
    vocab = 32_000 if args.small else 128_167  # Hunyuan-A13B's vocabulary
    rows = []
    for batch in (1, 16, 64):
        logits = torch.randn(batch, vocab, device=args.device, dtype=dtype) * 4
        t_ref, t_tri, diff = measure(
            kernels.exit_confidence_triton,
            kernels.exit_confidence_reference,
            (logits,),
            args.rep_ms,
        )
        moved = logits.numel() * logits.element_size()
        rows.append(
            [
                batch,
                t_ref * 1e3,
                t_tri * 1e3,
                t_ref / t_tri,
                moved / (t_tri * 1e-3) / args.peak_bandwidth,
                diff,
            ]
        )
    print_table(
        f"exit_confidence, V={vocab} {args.dtype} logits (baseline: torch reference)",
        ["rows", "ref us", "triton us", "speed-up", "of peak", "max diff"],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench.kernels_gpu: no CUDA device here; nothing to measure (the kernels are "
            "tested on the CPU with TRITON_INTERPRET=1)."
        )
        return 0
    if not has_triton():
        print("bench.kernels_gpu: triton does not import here; nothing to measure.")
        return 0
    dtype = DTYPES[args.dtype]
    name = torch.cuda.get_device_name(args.device)
    print(f"device: {name}, peak bandwidth {args.peak_bandwidth:.3g} B/s")
    bench_fused_moe(args, dtype)
    bench_rmsnorm(args, dtype)
    bench_exit_confidence(args, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
