"""CPU decode GEMV: `cpu_linear(x, weight, bias)` is `F.linear` through `kernels/cpu_gemv.c` when
the C kernel applies, for the few-row products of single-stream and small-batch decode.

torch's CPU paths for `x [M, in] @ W[out, in].T` with small M stream float32 weights at about half
the machine's read bandwidth and bfloat16 weights at a few percent of it; the C kernel streams
both at close to the bandwidth (see `bench/cpu_gemv.py`). It applies to CPU tensors, contiguous
x [M, in] with 1 <= M <= 16 and W [out, in] (the nn.Linear layout), float32 or bfloat16 with x,
weight and bias all of one dtype, outside autograd, on a CPU with AVX-512 (the C file's scalar
fallback is slower than `F.linear`); everything else goes to `F.linear`.

The library is compiled on first use with `gcc -O3 -march=native -fopenmp` into
`$RUYIFLOW_CACHE` (default `~/.cache/ruyiflow/kernels/`), named by a hash of the source, the
flags and the CPU, built into a temporary file and renamed into place so concurrent processes
never load a half-written one. Without gcc, or if the build or load fails, one warning is logged
and every call takes `F.linear`. `RUYIFLOW_CPU_GEMV=0` selects `F.linear` too: the simple path is
one switch away and is the oracle in tests. The switch is read on first use (reading the
environment costs about as much as the kernel call on a small matrix); `reset()` re-reads it.

The library links the `libgomp.so.1` that torch has already loaded (one thread pool). It runs
on ONE thread unless `RUYIFLOW_GEMV_THREADS` (or `set_threads`) says otherwise: one core already
streams ~24 GB/s here, two stream more on an idle machine, but when another process competes for
a core (every node daemon beside a router, a test runner beside the nodes) each of the ~121 calls
per token waits at the OpenMP barrier for a descheduled thread and a token takes 50x longer.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gemv.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ENV_SWITCH = "RUYIFLOW_CPU_GEMV"
MAX_ROWS = 16
INT_MAX = 2**31 - 1

_PTR, _INT = ctypes.c_void_p, ctypes.c_int
# (x, weight, bias or None, y, M, in, out, num_threads) -> 0, or -1 outside the contract.
_ARGTYPES = [_PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT, _INT]

_lock = threading.Lock()
_threads = max(1, int(os.environ.get("RUYIFLOW_GEMV_THREADS", "1") or 1))


def set_threads(num_threads: int) -> None:
    """OpenMP threads per GEMV call (see the module docstring for why the default is 1)."""
    global _threads
    _threads = max(1, int(num_threads))


# dtype -> C function once loaded; {} when disabled or after a failed build or load (then never
# retried until `reset()`).
_kernels: dict[torch.dtype, ctypes._CFuncPtr] | None = None


def cache_dir() -> Path:
    """Where compiled libraries live: `$RUYIFLOW_CACHE`, else `~/.cache/ruyiflow/kernels`."""
    env = os.environ.get("RUYIFLOW_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ruyiflow" / "kernels"


def library_path(directory: Path | None = None) -> Path:
    """The library's file: its name hashes the source, the flags and this CPU (-march=native)."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(f"{platform.machine()} {_cpu_flags()}".encode())
    return (directory or cache_dir()) / f"cpu_gemv-{h.hexdigest()[:16]}.so"


def build(directory: Path | None = None) -> Path:
    """Compile the library unless its file exists already; return its path. Raises on failure."""
    path = library_path(directory)
    if path.exists():
        return path
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [gcc, *CFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"gcc failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it private
        os.replace(tmp, path)  # atomic: another process sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def is_available() -> bool:
    """Whether `cpu_linear` can use the C kernel: enabled, built and loaded (builds if needed)."""
    return bool(_load())


def is_enabled() -> bool:
    """Whether `RUYIFLOW_CPU_GEMV` lets calls use the C kernel (anything but `0`)."""
    return os.environ.get(ENV_SWITCH, "1").strip() != "0"


def reset() -> None:
    """Forget the loaded kernel: the next call re-reads `RUYIFLOW_CPU_GEMV` and reloads (tests)."""
    global _kernels
    with _lock:
        _kernels = None


def cpu_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through the C kernel when it applies (see module docstring)."""
    # Checks are inlined and cheapest first: this runs ~121 times per decoded token.
    kernels = _kernels if _kernels is not None else _load()
    fn = kernels.get(x.dtype)
    if (
        fn is not None
        and x.dim() == 2
        and weight.dim() == 2
        and weight.dtype is x.dtype
        and x.is_cpu
        and weight.is_cpu
        and x.is_contiguous()
        and weight.is_contiguous()
        and (bias is None or _bias_applies(bias, weight))
        and not (torch.is_grad_enabled() and _needs_grad(x, weight, bias))
    ):
        num_rows, in_features = x.shape
        out_features, w_in = weight.shape
        if (
            1 <= num_rows <= MAX_ROWS
            and w_in == in_features
            and 0 < in_features <= INT_MAX
            and 0 < out_features <= INT_MAX
        ):
            y = torch.empty(num_rows, out_features, dtype=x.dtype)  # [M, out]
            b = None if bias is None else bias.data_ptr()
            args = (num_rows, in_features, out_features, _threads)
            if fn(x.data_ptr(), weight.data_ptr(), b, y.data_ptr(), *args) == 0:
                return y
    return F.linear(x, weight, bias)


def _bias_applies(bias: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        bias.dtype is weight.dtype
        and bias.is_cpu
        and bias.dim() == 1
        and bias.shape[0] == weight.shape[0]
        and bias.is_contiguous()
    )


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)


def _load() -> dict[torch.dtype, ctypes._CFuncPtr]:
    global _kernels
    with _lock:
        if _kernels is None:
            _kernels = _load_kernels() if is_enabled() else {}
        return _kernels


def _load_kernels() -> dict[torch.dtype, ctypes._CFuncPtr]:
    try:
        lib = ctypes.CDLL(str(build()))
        f32, bf16 = lib.ruyiflow_gemv_f32, lib.ruyiflow_gemv_bf16
        if not lib.ruyiflow_gemv_simd():  # the plain-C loops lose to F.linear
            raise RuntimeError("this CPU has no AVX-512 (the library holds the scalar fallback)")
    except Exception as e:  # no gcc, a failed build, an unloadable file: F.linear serves
        log.warning("CPU GEMV kernel unavailable, using F.linear: %s", e)
        return {}
    for fn in (f32, bf16):
        fn.argtypes, fn.restype = _ARGTYPES, _INT
    return {torch.float32: f32, torch.bfloat16: bf16}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
