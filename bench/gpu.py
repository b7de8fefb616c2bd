"""`ruyiflow bench gpu`: the GPU check of the engine on one CUDA device (a prepared, self-checking
script: about 10 minutes on an H100/H200; it fails at once, saying why, without CUDA or Triton).

1. `pytest -m gpu` (greedy parity with transformers on CUDA, MLA, CUDA-graph decode == eager
   decode token for token); on a failure the figures are still measured, and the exit is 1.
2. Ruyi-7B (Qwen2.5-7B dims, exits 11/15/19/23/27, bf16, random weights; `bench.gpu_models`):
   single-stream decode per exit vs the HBM bound (weight bytes a token reads / measured copy
   bandwidth; target >= 0.75 at exit 27, exit 11 >= 0.85 x the depth ratio faster than 27); vs
   transformers `generate` (bf16, sdpa) on the same weights (target >= 5x); batch 64 aggregate vs
   single stream at 512 tokens of context (target >= 30x); the largest batch the default memory
   fraction admits at 2,048 tokens; hidden handoff export/import at 512 and 4,096 tokens; CUDA
   graphs (off by default in serving) vs eager decode, with their tokens compared.
3. JoyAI-LLM Flash's DeepSeek-V3 config cut to `--moe-layers`: the fused MoE Triton kernel vs the
   torch reference at 1, 16, 64, 256 tokens (target >= 3x at 64), MoE decode vs transformers.
Peak host RSS while loading each checkpoint onto the device is reported as a multiple of its size.

`--dry-run` runs steps 2-3 at toy sizes on the CPU to check the script itself (its figures mean
nothing). Exit status: 0 when everything ran (missed targets are listed), 1 when the gpu tests
fail, 2 when this machine cannot run the check.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ruyiflow.bench.gpu_report import Report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", help="a CUDA device: cuda or cuda:N")
    p.add_argument("--tokens", type=int, default=64, help="decode tokens per measurement")
    p.add_argument("--moe-layers", type=int, default=4, help="JoyAI-LLM Flash cut to this depth")
    p.add_argument("--kv-gib", type=float, default=24.0, help="KV pool of the measuring engines")
    p.add_argument("--skip-tests", action="store_true", help="do not run `pytest -m gpu` first")
    p.add_argument(
        "--checkout", default=".", help="the repository checkout whose tests/ `pytest -m gpu` runs"
    )
    p.add_argument("--test-timeout", type=int, default=300, help="seconds for `pytest -m gpu`")
    p.add_argument(
        "--dry-run", action="store_true", help="toy sizes on the CPU (checks the script)"
    )
    p.add_argument("--json", action="store_true")


def check_machine(args: argparse.Namespace) -> torch.device | str:
    """The CUDA device to measure on, or the reason this machine cannot run the check."""
    from ruyiflow.engine.device import resolve_device
    from ruyiflow.engine.errors import ModelLoadError
    from ruyiflow.kernels.dispatch import has_triton

    if args.dry_run:
        return torch.device("cpu")
    try:
        device = resolve_device(args.device)
    except ModelLoadError as exc:
        return str(exc)
    if device.type != "cuda":
        return f"device {args.device!r} is not a CUDA device"
    if not has_triton():
        return "Triton is not installed (the served path's kernels need it)"
    return device


def run_gpu_tests(checkout: str, timeout: int) -> tuple[bool, str]:
    """`pytest -m gpu` over the engine, MoE and kernel tests; (passed, its summary line)."""
    repo = Path(checkout).resolve()  # the tests are not installed with the package
    if not (repo / "tests" / "engine").is_dir():
        return False, f"no tests/engine in {repo} (run from a checkout, or --checkout DIR)"
    cmd = [sys.executable, "-P", "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    cmd += ["tests/engine", "tests/moe", "tests/kernels"]
    try:
        done = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"pytest -m gpu ran past {timeout} s"
    lines = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode != 0:
        print("\n".join(lines[-40:]), file=sys.stderr)
    return done.returncode == 0, lines[-1] if lines else "(no output)"


def free_device(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> int:
    device = check_machine(args)
    if isinstance(device, str):
        print(f"bench gpu: cannot run here: {device}", file=sys.stderr)
        return 2
    report = Report(
        "cpu (dry run: toy sizes, figures mean nothing)"
        if args.dry_run
        else torch.cuda.get_device_name(device)
    )
    passed = True
    if not (args.skip_tests or args.dry_run):
        passed, summary = run_gpu_tests(args.checkout, args.test_timeout)
        report.note(f"pytest -m gpu: {summary}" + ("" if passed else " (FAILED: see above)"))
    from ruyiflow.bench.gpu_dense import dense_figures
    from ruyiflow.bench.gpu_moe import moe_figures

    with tempfile.TemporaryDirectory(prefix="ruyiflow-bench-gpu-") as tmp:
        dense_figures(args, device, Path(tmp) / "ruyi-7b", report)
        free_device(device)
        moe_figures(args, device, Path(tmp) / "joyai", report)
        free_device(device)
    report.print(args.json)
    if not passed:
        print("bench gpu: the gpu tests failed (figures measured anyway)", file=sys.stderr)
    return 0 if passed else 1


def main() -> int:  # python -m ruyiflow.bench.gpu
    parser = argparse.ArgumentParser(prog="ruyiflow bench gpu", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
