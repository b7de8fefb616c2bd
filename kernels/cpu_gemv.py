"""CPU decode GEMV: `cpu_linear(x, weight, bias)` is `F.linear` through `kernels/cpu_gemv.c` when
the C kernel applies, for the few-row products of single-stream and small-batch decode.

torch's CPU paths for `x [M, in] @ W[out, in].T` with small M stream float32 weights at about half
the machine's read bandwidth and bfloat16 weights at a few percent of it; the C kernel streams
both at close to the bandwidth (see `bench/cpu_gemv.py`). It applies to CPU tensors, contiguous
x [M, in] with 1 <= M <= 16 and W [out, in] (the nn.Linear layout), float32 or bfloat16 with x,
weight and bias all of one dtype, outside autograd; everything else goes to `F.linear`.

Paths. The C file is built once per instruction set with explicit flags (never -march=native)
and the build is chosen from the CPU's flags at run time: `avx512` (F, BW, VL; with vdpbf16ps
where the CPU has AVX512_BF16), `avx2` (AVX2 + FMA), `plain` (any x86-64: compiler-vectorised C),
or `off` (`F.linear`). `RUYIFLOW_CPU_GEMV` picks: `auto` (default: the fastest the CPU has on
x86-64, `off` elsewhere), a path name to force it (one the CPU lacks raises `UnsupportedPath` on
first use, never a crash), or `off` (`0` too). The simple path is one switch away and is the
oracle in tests. The switch is read on first use (reading the environment costs about as much as
the kernel call on a small matrix); `reset()` re-reads it. `active_path()` says what runs.

One contract on every kernel path: results depend only on the values, never on M, the thread
count or the tensors' addresses, so a row computed alone equals that row in a batch of up to 16,
bit for bit. `avx512` and `avx2` sum in the same order and agree bit for bit too (but where
vdpbf16ps flushes a bfloat16 subnormal); `plain` (8 lanes, no FMA) rounds differently. `off` gives
whatever `F.linear` gives: its blocking can depend on M and on the weights' alignment.

Builds go to `$RUYIFLOW_CACHE` (default `~/.cache/ruyiflow/kernels/`), named by the path and a
hash of the sources and flags (so a cache shared across machines holds one file per build, and a
CPU loads only a build its flags allow), built into a temporary file and renamed into place so
concurrent processes never load a half-written one. In `auto`, no gcc or a CPU other than x86-64
gives one INFO line; a failed build or load one warning; either way every call takes `F.linear`.

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_gemv.c")  # includes the file of its instruction set:
INCLUDED = (
    SOURCE.with_name("cpu_gemv_avx512.c"),
    SOURCE.with_name("cpu_gemv_avx2.c"),
    SOURCE.with_name("cpu_gemv_plain.c"),
    SOURCE.with_name("cpu_paged_attention.c"),  # decode attention, same library (cpu_attention)
)
CFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
ENV_SWITCH = "RUYIFLOW_CPU_GEMV"
PATHS = ("avx512", "avx2", "plain")  # fastest first
SWITCH_VALUES = ("auto", *PATHS, "off")
MAX_ROWS = 16
INT_MAX = 2**31 - 1


@dataclass(frozen=True)
class Build:
    """One build of the C file: its path, the /proc/cpuinfo flags it needs, its -m flags."""

    path: str
    needs: frozenset[str]
    flags: tuple[str, ...]


_AVX512 = ("avx512f", "avx512bw", "avx512vl")
_AVX512_FLAGS = tuple(f"-m{f}" for f in _AVX512)
BUILDS = (  # per path, the most capable first
    Build("avx512", frozenset({*_AVX512, "avx512_bf16"}), (*_AVX512_FLAGS, "-mavx512bf16")),
    Build("avx512", frozenset(_AVX512), _AVX512_FLAGS),
    Build("avx2", frozenset({"avx2", "fma"}), ("-mavx2", "-mfma")),
    Build("plain", frozenset(), ()),
)


class UnsupportedPath(RuntimeError):
    """`RUYIFLOW_CPU_GEMV` forces a path this CPU cannot run."""


_PTR, _INT = ctypes.c_void_p, ctypes.c_int
# (x, weight, bias or None, y, M, in, out, num_threads) -> 0, or -1 outside the contract.
_ARGTYPES = [_PTR, _PTR, _PTR, _PTR, _INT, _INT, _INT, _INT]

_lock = threading.Lock()
_threads = max(1, int(os.environ.get("RUYIFLOW_GEMV_THREADS", "1") or 1))
# dtype -> C function once loaded; {} when off or after a failed build or load in `auto` (then
# never retried until `reset()`).
_kernels: dict[torch.dtype, ctypes._CFuncPtr] | None = None
_active = "off"
_attention: ctypes._CFuncPtr | None = None  # the library's paged attention, once loaded


def set_threads(num_threads: int) -> None:
    """OpenMP threads per GEMV call (see the module docstring for why the default is 1)."""
    global _threads
    _threads = max(1, int(num_threads))


def thread_count() -> int:
    """OpenMP threads per call (GEMV and the decode attention of `kernels.cpu_attention`)."""
    return _threads


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def build_for(path: str) -> Build:
    """The build of `path` this CPU runs; `UnsupportedPath` naming the missing flags if none."""
    if path not in PATHS:
        raise ValueError(f"unknown CPU GEMV path {path!r}: expected one of {', '.join(PATHS)}")
    flags = cpu_flags()
    builds = [b for b in BUILDS if b.path == path]
    for b in builds:
        if b.needs <= flags:
            return b
    missing = ", ".join(sorted(builds[-1].needs - flags))
    runs = ", ".join(supported_paths())
    raise UnsupportedPath(f"this CPU lacks {missing} for the {path} GEMV (it runs {runs} or off)")


def supported_paths() -> tuple[str, ...]:
    """The kernel paths this CPU can run, fastest first (`plain` wherever gcc builds)."""
    flags = cpu_flags()
    return tuple(dict.fromkeys(b.path for b in BUILDS if b.needs <= flags))


def requested_path() -> str:
    """`RUYIFLOW_CPU_GEMV` as one of SWITCH_VALUES (`0` is `off`, `1` and empty are `auto`)."""
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    value = {"": "auto", "1": "auto", "0": "off"}.get(value, value)
    if value not in SWITCH_VALUES:
        raise ValueError(f"{ENV_SWITCH}={value!r}: expected one of {', '.join(SWITCH_VALUES)}")
    return value


def cache_dir() -> Path:
    """Where compiled libraries live: `$RUYIFLOW_CACHE`, else `~/.cache/ruyiflow/kernels`."""
    env = os.environ.get("RUYIFLOW_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ruyiflow" / "kernels"


def library_path(build_: Build, directory: Path | None = None) -> Path:
    """The file of a build: named by its path and a hash of the sources, flags and machine."""
    h = hashlib.sha256()
    for source in (SOURCE, *INCLUDED):
        h.update(source.read_bytes())
    h.update(" ".join((*CFLAGS, *build_.flags, platform.machine())).encode())
    return (directory or cache_dir()) / f"cpu_gemv-{build_.path}-{h.hexdigest()[:16]}.so"


def build(build_: Build, directory: Path | None = None) -> Path:
    """Compile a build unless its file exists already; return its path. Raises on failure
    (`FileNotFoundError` without gcc)."""
    path = library_path(build_, directory)
    if path.exists():
        return path
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FileNotFoundError("gcc not found on PATH")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        cmd = [gcc, *CFLAGS, *build_.flags, str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"gcc failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it private
        os.replace(tmp, path)  # atomic: another process sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def active_path() -> str:
    """The path `cpu_linear` runs: `avx512`, `avx2`, `plain`, or `off` (`F.linear`)."""
    _load()
    return _active


def is_available() -> bool:
    """Whether `cpu_linear` can use a C kernel: enabled, built and loaded (builds if needed)."""
    return bool(_load())


def reset() -> None:
    """Forget the loaded kernel: the next call re-reads `RUYIFLOW_CPU_GEMV` and reloads (tests)."""
    global _kernels, _active, _attention
    with _lock:
        _kernels, _active, _attention = None, "off", None


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
    global _kernels, _active
    with _lock:
        if _kernels is None:
            requested = requested_path()
            if requested == "auto":
                _active, _kernels = _load_auto()
            elif requested == "off":
                _active, _kernels = "off", {}
            else:  # forced: a CPU without it or a failed build raises here, on every call
                _kernels, _active = _load_library(build_for(requested)), requested
        return _kernels


def _load_auto() -> tuple[str, dict[torch.dtype, ctypes._CFuncPtr]]:
    """The fastest path this CPU has, or `off` with one log line."""
    if not is_x86_64():
        log.info("CPU GEMV: no C kernel for %s, decode uses F.linear", platform.machine())
        return "off", {}
    best = build_for(supported_paths()[0])  # `plain` at worst
    if not library_path(best).exists() and shutil.which("gcc") is None:
        log.info("CPU GEMV: gcc not found, decode uses F.linear")
        return "off", {}
    try:
        return best.path, _load_library(best)
    except Exception as e:  # a failed build, an unloadable file: F.linear serves
        log.warning("CPU GEMV kernel unavailable, using F.linear: %s", e)
        return "off", {}


def attention_kernel() -> ctypes._CFuncPtr | None:
    """The library's `ruyiflow_paged_attention` (kernels.cpu_attention), or None when `off`."""
    if _kernels is None:
        _load()
    return _attention


def _load_library(build_: Build) -> dict[torch.dtype, ctypes._CFuncPtr]:
    global _attention
    path = build(build_)
    lib = ctypes.CDLL(str(path))
    lib.ruyiflow_gemv_path.restype = ctypes.c_char_p
    compiled = lib.ruyiflow_gemv_path().decode()
    if compiled != build_.path:  # a compiler that ignored the -m flags
        raise RuntimeError(f"{path.name} holds the {compiled} GEMV, not {build_.path}")
    f32, bf16 = lib.ruyiflow_gemv_f32, lib.ruyiflow_gemv_bf16
    for fn in (f32, bf16):
        fn.argtypes, fn.restype = _ARGTYPES, _INT
    attention = lib.ruyiflow_paged_attention
    attention.argtypes = [_INT, *[_PTR] * 11, ctypes.c_float, _INT]
    attention.restype = _INT
    _attention = attention
    return {torch.float32: f32, torch.bfloat16: bf16}
