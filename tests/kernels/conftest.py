"""Kernel tests: Triton kernels run in Triton's CPU interpreter and are compared with references.

`TRITON_INTERPRET=1` is set here, before any kernel launch imports triton (kernels import it
lazily, so tests elsewhere that import the engine first do no harm).
The Triton path of the public functions is forced per test with the `triton_path` fixture.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ruyiflow.kernels import cpu_gemv

os.environ["TRITON_INTERPRET"] = "1"

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture
def triton_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the public `kernels.*` functions to Triton (the interpreter, here)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RUYIFLOW_KERNELS", "triton")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache directory for this module's builds of the CPU library (GEMV, attention)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the C CPU kernels cannot be built")
    directory = tmp_path_factory.mktemp("kernels")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUYIFLOW_CACHE", str(directory))
        yield directory
    cpu_gemv.reset()


@pytest.fixture(params=cpu_gemv.PATHS)
def path(
    request: pytest.FixtureRequest, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """The CPU library forced onto one path (skipped where the CPU lacks it)."""
    try:
        cpu_gemv.build_for(request.param)
    except cpu_gemv.UnsupportedPath as e:
        pytest.skip(str(e))
    monkeypatch.setenv(cpu_gemv.ENV_SWITCH, request.param)
    cpu_gemv.reset()
    assert cpu_gemv.active_path() == request.param
    yield request.param
    monkeypatch.undo()
    cpu_gemv.reset()


_COMPILE_SCRIPT = """
import importlib, json, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except Exception as exc:
    print("SKIP", exc)
    sys.exit(3)
for job in json.load(sys.stdin):
    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    constexprs = job["constexprs"]
    signature = job["signature"] | {name: "constexpr" for name in constexprs}
    src = ASTSource(fn=kernel.jitted(), signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=job["options"])
    assert "cubin" in compiled.asm
"""


@pytest.fixture(scope="session")
def sm90_compile() -> Callable[[list[dict[str, Any]]], None]:
    """Compile kernels ahead of time for an H100 (sm_90, ttir → cubin) with no GPU present.

    The interpreter runs a kernel body as numpy code and accepts constructs the compiler rejects;
    this catches those. It runs in a subprocess because a process that imported triton under
    TRITON_INTERPRET=1 cannot compile. Each job: module, kernel, signature, constexprs, options.
    """

    def compile_(jobs: list[dict[str, Any]]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_DEFAULT_FP_FUSION"] = "1"  # silence triton 3.9's unset-default warning
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILE_SCRIPT],
            input=json.dumps(jobs),
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode == 3:
            pytest.skip(f"triton's compiler is unavailable: {proc.stdout.strip()}")
        assert proc.returncode == 0, proc.stderr[-4000:]

    return compile_


@pytest.fixture
def assert_close() -> Callable[..., None]:
    """`assert_close(actual, expected, dtype, scale=1.0)` with per-dtype tolerances."""
    return _assert_close


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    atol, rtol = {
        torch.float32: (1e-5, 1e-5),
        torch.float16: (2e-3, 2e-3),
        # bf16 has 8 mantissa bits, and the interpreter truncates float32 → bf16 casts
        # (triton 3.9 cast_impl passes no rounding mode), so allow about 2 ulp.
        torch.bfloat16: (1.6e-2, 1.6e-2),
    }[dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale
    )
