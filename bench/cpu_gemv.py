"""`ruyiflow bench cpu-gemv`: weight streaming rate of `kernels.cpu_gemv.cpu_linear` on each
kernel path (`--paths`, default every path this CPU has) against `F.linear`, for decode-sized
x [M, in], on the matrices of a SmolLM2-135M-shaped model.

One "token" runs every matrix once (30 layers of qkv, o, gate_up, down, then the LM head), so the
weights (0.54 GB float32, 0.27 GB bfloat16) never stay in cache, as in decode. GB/s counts weight
bytes only; the bound is `x.sum()` over a 1 GiB buffer, sampled between passes. The sides of one
(dtype, M) are timed in turns, one pass each, and each figure is a median (and the best pass):
the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ruyiflow.kernels import cpu_gemv

HIDDEN, INTERMEDIATE, NUM_LAYERS, VOCAB = 576, 1536, 30, 49152
# [out, in] per layer: fused qkv (9 + 3 + 3 heads of 64), o, fused gate_up, down.
LAYER_SHAPES = [(960, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]

FLAGS_SHOWN = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16"})

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=10, help="timed passes per measurement")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="values of M")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument(
        "--paths",
        nargs="+",
        choices=cpu_gemv.PATHS,
        help="kernel paths (default: all this CPU has)",
    )


class Bound:
    """`x.sum()` over a 1 GiB float32 buffer: the read bandwidth the kernels are measured against.

    Sampled after every timed pass, so each figure is compared with the bandwidth of the same
    moment: on a shared machine it drifts by tens of percent within a run.
    """

    def __init__(self, gib: float = 1.0) -> None:
        self.x = torch.ones(int(gib * 2**30) // 4)
        self.x.sum()
        self.samples: list[float] = []

    def sample(self) -> None:
        t = time.perf_counter()
        self.x.sum()
        self.samples.append(self.x.numel() * 4 / (time.perf_counter() - t))

    def median(self, last: int | None = None) -> float:
        """Bytes/s: the median of all samples, or of the last `last`."""
        samples = sorted(self.samples[-last:] if last else self.samples)
        return samples[len(samples) // 2]


def model_weights(dtype: torch.dtype) -> list[torch.Tensor]:
    shapes = LAYER_SHAPES * NUM_LAYERS + [(VOCAB, HIDDEN)]
    return [torch.randn(shape).mul_(0.02).to(dtype) for shape in shapes]


def seconds_per_pass(linear: Linear, weights: list[torch.Tensor], xs: dict) -> float:
    """Seconds of one pass over all weights ("one token")."""
    t = time.perf_counter()
    for w in weights:
        linear(xs[w.shape[1]], w, None)
    return time.perf_counter() - t


def path_linear(path: str) -> Linear:
    """`cpu_linear` forced onto `path` (switched on each call: the paths are timed in turns)."""

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if cpu_gemv.active_path() != path:
            os.environ[cpu_gemv.ENV_SWITCH] = path
            cpu_gemv.reset()
        return cpu_gemv.cpu_linear(x, w, b)

    return linear


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    paths = args.paths or list(cpu_gemv.supported_paths())
    sides = {"F.linear": F.linear} | {p: path_linear(p) for p in paths}
    for p in paths:  # build (or fail on an unsupported path) before anything is timed
        sides[p](torch.ones(1, 1), torch.ones(1, 1), None)
    bound = Bound()
    print(f"torch threads {torch.get_num_threads()}, GEMV threads 1, paths {', '.join(paths)}")
    print(f"CPU: {' '.join(sorted(cpu_gemv.cpu_flags() & FLAGS_SHOWN)) or 'no SIMD flags read'}")
    header = ("dtype", 9), ("M", 3), ("path", 10), ("ms/token", 9), ("GB/s", 6), ("best", 6)
    print(
        " ".join(f"{name:>{width}}" for name, width in header),
        f"{'bound':>6} {'of bound':>8} {'vs F.linear':>11}",
    )
    with torch.inference_mode():
        for name in args.dtypes:
            dtype = getattr(torch, name)
            weights = model_weights(dtype)
            num_bytes = sum(w.numel() * w.element_size() for w in weights)
            for rows in args.rows:
                xs = {n: torch.randn(rows, n).to(dtype) for n in {w.shape[1] for w in weights}}
                times: dict[str, list[float]] = {label: [] for label in sides}
                for turn in range(args.tokens + 1):  # turn 0 warms up
                    for label, linear in sides.items():
                        s = seconds_per_pass(linear, weights, xs)
                        if turn:
                            times[label].append(s)
                            bound.sample()
                base = median(times["F.linear"])
                near = bound.median(last=args.tokens * len(sides))
                for label, ts in times.items():
                    s = median(ts)
                    rate = num_bytes / s
                    print(
                        f"{name:>9} {rows:>3} {label:>10} {s * 1e3:>9.2f} {rate / 1e9:>6.1f} "
                        f"{num_bytes / min(ts) / 1e9:>6.1f} {near / 1e9:>6.1f} "
                        f"{rate / near:>8.0%} {base / s:>10.2f}x"
                    )
            del weights
    print(f"bound: x.sum() over 1 GiB, median of the run  {bound.median() / 1e9:.1f} GB/s")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    raise SystemExit(main())
