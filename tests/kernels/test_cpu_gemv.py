"""CPU decode GEMV (`kernels.cpu_gemv`): the C kernel against `F.linear` in float64 (float32) and
float32 math (bfloat16), per-row bitwise determinism, fallbacks, and the build cache.

The kernel's tests build the library once per module into a temporary cache and skip only where
gcc is missing. Tolerances are relative to sum_i |x[m, i] * W[o, i]| + |bias[o]|, the scale a dot
product's rounding error is proportional to.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ruyiflow.kernels import cpu_gemv
from ruyiflow.kernels.cpu_gemv import cpu_linear

# (out, in): in not a multiple of 16/32, one or several chunks of `in` (float32 M >= 5 at 1536,
# M = 16 at 576; 5000 at every M > 1), a single output, a tall LM-head-like matrix.
SHAPES = [(1, 17), (3, 100), (64, 576), (96, 1536), (40, 5000), (49157, 48)]
ROWS = [1, 2, 5, 8, 16]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The kernel built into (and loaded from) a fresh cache directory for this module."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: the C GEMV kernel cannot be built")
    directory = tmp_path_factory.mktemp("kernels")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RUYIFLOW_CACHE", str(directory))
        mp.delenv(cpu_gemv.ENV_SWITCH, raising=False)
        cpu_gemv.reset()
        assert cpu_gemv.is_available()
        yield directory
    cpu_gemv.reset()


@pytest.fixture
def kernel_only(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any call that would fall back to `F.linear` instead of running the kernel."""

    def fallback(*args: object) -> None:
        raise AssertionError("cpu_linear fell back to F.linear")

    monkeypatch.setattr(cpu_gemv, "F", SimpleNamespace(linear=fallback))


@pytest.fixture
def fallback_only(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any call that would reach the C kernel instead of `F.linear`."""

    def kernel(*args: object) -> int:
        raise AssertionError("cpu_linear ran the C kernel")

    monkeypatch.setattr(cpu_gemv, "_kernels", {torch.float32: kernel, torch.bfloat16: kernel})


def inputs(
    out: int, in_: int, rows: int, dtype: torch.dtype, bias: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_, generator=gen).to(dtype)
    w = (torch.randn(out, in_, generator=gen) / in_**0.5).to(dtype)
    b = torch.randn(out, generator=gen).to(dtype) if bias else None
    return x, w, b


def scale(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """sum_i |x[m, i] w[o, i]| + |b[o]| in float64: [M, out]."""
    return F.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_float64(kernel_only, shape, rows, bias) -> None:
    x, w, b = inputs(*shape, rows, torch.float32, bias)
    y = cpu_linear(x, w, b)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    err = (y.double() - expected).abs() / scale(x, w, b)
    assert err.max().item() < 1e-5


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_matches_float32_math(kernel_only, shape, rows, bias) -> None:
    x, w, b = inputs(*shape, rows, torch.bfloat16, bias)
    y = cpu_linear(x, w, b)
    assert y.shape == (rows, shape[0]) and y.dtype == torch.bfloat16
    expected = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    # One bfloat16 rounding of the output (half an ulp: 2^-9 relative) on top of float32 sums.
    err = (y.double() - expected.double()).abs()
    assert (err <= 2**-8 * expected.double().abs() + 1e-5 * scale(x, w, b)).all()


def test_bfloat16_output_rounds_to_nearest_even(kernel_only) -> None:
    # x = [1, 1]: each y is w0 + w1, exact in float32, so the only rounding is the bf16 store.
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(4096, 2, generator=gen).to(torch.bfloat16)
    ties = torch.tensor([[1.0, 2**-8], [1.0, 3 * 2**-8], [-1.0, -(2**-8)]]).to(torch.bfloat16)
    w = torch.cat([w, ties])  # 1 + 2^-8 -> 1, 1 + 3 * 2^-8 -> 1 + 2^-6: ties go to even
    x = torch.ones(1, 2, dtype=torch.bfloat16)
    y = cpu_linear(x, w, None)
    expected = (w.float()[:, 0] + w.float()[:, 1]).to(torch.bfloat16)
    assert torch.equal(y[0], expected)
    assert y[0, -3:].tolist() == [1.0, 1.0 + 2**-6, -1.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 576), (96, 1536), (40, 5000), (3, 100)])
def test_row_alone_equals_row_in_batch_bitwise(kernel_only, dtype, shape) -> None:
    x, w, b = inputs(*shape, 16, dtype, bias=True)
    batch16 = cpu_linear(x, w, b)
    batch8 = cpu_linear(x[:8].contiguous(), w, b)
    assert torch.equal(batch8, batch16[:8])
    from ruyiflow.kernels import cpu_gemv

    try:
        for num_threads in (1, 2):
            cpu_gemv.set_threads(num_threads)
            batch16 = cpu_linear(x, w, b)
            for m in range(16):
                alone = cpu_linear(x[m : m + 1].contiguous(), w, b)
                assert torch.equal(alone[0], batch16[m]), (num_threads, m)
    finally:
        cpu_gemv.set_threads(1)


def unsupported_cases() -> dict[str, tuple]:
    x, w, b = inputs(24, 40, 3, torch.float32, bias=True)
    return {
        "17 rows": (torch.randn(17, 40), w, b),
        "3-D x": (x[None], w, b),
        "non-contiguous x": (torch.randn(40, 3).t(), w, b),
        "non-contiguous weight": (x, torch.randn(40, 24).t(), b),
        "non-contiguous bias": (x, w, torch.randn(24, 2)[:, 0]),
        "float16": (x.half(), w.half(), b.half()),
        "float64": (x.double(), w.double(), b.double()),
        "mixed dtypes": (x, w.bfloat16(), None),
        "bias of another dtype": (x.bfloat16(), w.bfloat16(), b),
        "empty x": (torch.randn(0, 40), w, b),
        "empty in": (torch.randn(3, 0), torch.randn(24, 0), b),
        "empty out": (x, torch.randn(0, 40), None),
    }


@pytest.mark.parametrize("case", list(unsupported_cases()))
def test_unsupported_inputs_fall_back(fallback_only, case) -> None:
    x, w, b = unsupported_cases()[case]
    try:
        expected = F.linear(x, w, b)
    except RuntimeError:  # e.g. a bias of another dtype: cpu_linear must fail the same way
        with pytest.raises(RuntimeError):
            cpu_linear(x, w, b)
        return
    assert torch.equal(cpu_linear(x, w, b), expected)


def test_autograd_falls_back(fallback_only) -> None:
    x, w, b = inputs(24, 40, 3, torch.float32, bias=True)
    w.requires_grad_(True)
    y = cpu_linear(x, w, b)
    assert torch.equal(y, F.linear(x, w, b))
    y.sum().backward()
    assert torch.allclose(w.grad, x.sum(0).expand(24, 40))


def test_disabled_by_env(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_gemv.ENV_SWITCH, "0")
    cpu_gemv.reset()
    try:
        assert not cpu_gemv.is_available()
        for dtype in (torch.float32, torch.bfloat16):
            x, w, b = inputs(96, 1536, 8, dtype, bias=True)
            assert torch.equal(cpu_linear(x, w, b), F.linear(x, w, b))
    finally:
        monkeypatch.undo()
        cpu_gemv.reset()
    assert cpu_gemv.is_available()


def test_missing_gcc_warns_once_and_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("RUYIFLOW_CACHE", str(tmp_path))  # empty: nothing to load
    monkeypatch.delenv(cpu_gemv.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpu_gemv.shutil, "which", lambda name: None)
    cpu_gemv.reset()
    try:
        x, w, b = inputs(96, 576, 2, torch.float32, bias=True)
        with caplog.at_level(logging.WARNING, logger=cpu_gemv.__name__):
            for _ in range(3):
                assert torch.equal(cpu_linear(x, w, b), F.linear(x, w, b))
            assert not cpu_gemv.is_available()
        assert len(caplog.records) == 1 and "gcc not found" in caplog.records[0].getMessage()
    finally:
        monkeypatch.undo()
        cpu_gemv.reset()


def test_build_cache_is_reused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (library,) = cache.glob("cpu_gemv-*.so")  # one library, no temporary files left behind
    assert [p.name for p in cache.iterdir()] == [library.name]
    assert library == cpu_gemv.library_path()
    mtime = library.stat().st_mtime_ns

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a cached library")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    cpu_gemv.reset()
    assert cpu_gemv.is_available()
    assert cpu_gemv.build() == library and library.stat().st_mtime_ns == mtime
