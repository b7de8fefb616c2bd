"""CPU decode GEMV (`kernels.cpu_gemv`): every kernel path against `F.linear` in float64 (float32)
and float32 math (bfloat16), bitwise determinism per row and per address, path selection and its
errors, fallbacks, and the build cache.

Kernel tests run once per path (`avx512`, `avx2`, `plain`); a path this CPU lacks is skipped with
the reason, and every kernel test skips where gcc is missing. Builds go once per module into a
temporary cache. Tolerances are relative to sum_i |x[m, i] * W[o, i]| + |bias[o]|, the scale a dot
product's rounding error is proportional to.
"""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ruyiflow.kernels import cpu_gemv
from ruyiflow.kernels.cpu_gemv import UnsupportedPath, cpu_linear

# (out, in): in not a multiple of 8/16/32, one or several chunks of `in` (float32 M >= 5 at 1536,
# M = 16 at 576; 5000 at every M > 1), a single output, a tall LM-head-like matrix.
SHAPES = [(1, 17), (3, 100), (64, 576), (96, 1536), (40, 5000), (49157, 48)]
# Every block shape of both SIMD paths: 3 and 9 rows split into unequal x blocks.
ROWS = [1, 2, 3, 5, 8, 9, 16]
AVX2_ONLY = frozenset({"avx", "avx2", "fma", "f16c", "sse4_2"})


@pytest.fixture
def kernel_only(path: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The `path` fixture, failing any call that would fall back to `F.linear`."""

    def fallback(*args: object) -> None:
        raise AssertionError("cpu_linear fell back to F.linear")

    monkeypatch.setattr(cpu_gemv, "F", SimpleNamespace(linear=fallback))
    return path


@pytest.fixture
def fallback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any call that would reach a C kernel instead of `F.linear`."""

    def kernel(*args: object) -> int:
        raise AssertionError("cpu_linear ran the C kernel")

    monkeypatch.setattr(cpu_gemv, "_kernels", {torch.float32: kernel, torch.bfloat16: kernel})


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """A monkeypatch after which the next call re-reads the switch, and the one after the test."""
    cpu_gemv.reset()
    yield monkeypatch
    monkeypatch.undo()
    cpu_gemv.reset()


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
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_matches_float64(kernel_only, shape, bias) -> None:
    x, w, b = inputs(*shape, max(ROWS), torch.float32, bias)
    expected = F.linear(x.double(), w.double(), None if b is None else b.double())
    bound = 1e-5 * scale(x, w, b)
    for rows in ROWS:  # the first rows of x: rows are independent in the reference
        y = cpu_linear(x[:rows].contiguous(), w, b)
        assert y.shape == (rows, shape[0]) and y.dtype == torch.float32
        assert ((y.double() - expected[:rows]).abs() <= bound[:rows]).all(), rows


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_bfloat16_matches_float32_math(kernel_only, shape, bias) -> None:
    x, w, b = inputs(*shape, max(ROWS), torch.bfloat16, bias)
    expected = F.linear(x.float(), w.float(), None if b is None else b.float()).double()
    # One bfloat16 rounding of the output (half an ulp: 2^-9 relative) on float32 sums.
    bound = 2**-8 * expected.abs() + 1e-5 * scale(x, w, b)
    for rows in ROWS:
        y = cpu_linear(x[:rows].contiguous(), w, b)
        assert y.shape == (rows, shape[0]) and y.dtype == torch.bfloat16
        assert ((y.double() - expected[:rows]).abs() <= bound[:rows]).all(), rows


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
    try:
        for num_threads in (1, 2):
            cpu_gemv.set_threads(num_threads)
            batch16 = cpu_linear(x, w, b)
            for rows in (3, 8, 9):
                assert torch.equal(cpu_linear(x[:rows].contiguous(), w, b), batch16[:rows])
            for m in range(16):
                alone = cpu_linear(x[m : m + 1].contiguous(), w, b)
                assert torch.equal(alone[0], batch16[m]), (num_threads, m)
    finally:
        cpu_gemv.set_threads(1)


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of `t` whose data starts `offset` elements into a fresh buffer."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype)
    return buf[offset:].view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_does_not_depend_on_addresses(kernel_only, dtype) -> None:
    # Memory-mapped checkpoint shards leave weights at any offset (F.linear's result moves then).
    x, w, b = inputs(96, 1536, 5, dtype, bias=True)
    expected = cpu_linear(x, w, b)
    for offset in (1, 3, 8):
        y = cpu_linear(at_offset(x, offset), at_offset(w, offset), at_offset(b, offset))
        assert torch.equal(y, expected), offset


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_and_avx512_agree_bitwise(
    cache: Path, fresh: pytest.MonkeyPatch, dtype: torch.dtype
) -> None:
    # The two builds sum in the same order (vdpbf16ps differs only on subnormals: none here).
    if not {"avx512", "avx2"} <= set(cpu_gemv.supported_paths()):
        pytest.skip("this CPU lacks AVX-512 or AVX2: nothing to compare")
    results = []
    for path in ("avx512", "avx2"):
        fresh.setenv(cpu_gemv.ENV_SWITCH, path)
        cpu_gemv.reset()
        results.append([cpu_linear(*inputs(*shape, 9, dtype, bias=True)) for shape in SHAPES])
    for shape, a, b in zip(SHAPES, *results, strict=True):
        assert torch.equal(a, b), shape


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


@pytest.mark.parametrize("value", ["off", "0"])
def test_off_switch_is_F_linear(cache: Path, fresh: pytest.MonkeyPatch, value: str) -> None:
    fresh.setenv(cpu_gemv.ENV_SWITCH, value)
    assert cpu_gemv.active_path() == "off" and not cpu_gemv.is_available()
    for dtype in (torch.float32, torch.bfloat16):
        x, w, b = inputs(96, 1536, 8, dtype, bias=True)
        assert torch.equal(cpu_linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(None, None), (AVX2_ONLY, "avx2"), (frozenset({"sse2"}), "plain")],
    ids=["this CPU", "AVX2 only", "no AVX"],
)
def test_auto_picks_the_fastest_path_the_cpu_has(
    cache: Path, fresh: pytest.MonkeyPatch, flags: frozenset[str] | None, expected: str | None
) -> None:
    if not cpu_gemv.is_x86_64():
        pytest.skip("auto runs a kernel on x86-64 only")
    if expected is not None and expected not in cpu_gemv.supported_paths():
        pytest.skip(f"this CPU cannot run the {expected} build it would pick")
    fresh.delenv(cpu_gemv.ENV_SWITCH, raising=False)
    if flags is not None:  # a CPU with fewer features than this one
        fresh.setattr(cpu_gemv, "cpu_flags", lambda: flags)
    assert cpu_gemv.active_path() == (expected or cpu_gemv.supported_paths()[0])
    x, w, b = inputs(64, 576, 2, torch.float32, bias=True)
    torch.testing.assert_close(cpu_linear(x, w, b), F.linear(x, w, b))


def test_forcing_a_path_the_cpu_lacks_is_an_error(cache: Path, fresh: pytest.MonkeyPatch) -> None:
    fresh.setattr(cpu_gemv, "cpu_flags", lambda: AVX2_ONLY)
    fresh.setenv(cpu_gemv.ENV_SWITCH, "avx512")
    x, w, b = inputs(24, 40, 3, torch.float32, bias=True)
    for _ in range(2):  # and stays one, call after call
        with pytest.raises(UnsupportedPath, match="lacks avx512bw, avx512f, avx512vl.*avx2"):
            cpu_linear(x, w, b)
    fresh.setenv(cpu_gemv.ENV_SWITCH, "avx-512")
    cpu_gemv.reset()
    with pytest.raises(ValueError, match="expected one of auto, avx512, avx2, plain, off"):
        cpu_linear(x, w, b)


def test_other_machines_use_F_linear_with_one_info_line(
    fresh: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fresh.delenv(cpu_gemv.ENV_SWITCH, raising=False)
    fresh.setattr(cpu_gemv.platform, "machine", lambda: "aarch64")
    x, w, b = inputs(96, 576, 2, torch.float32, bias=True)
    with caplog.at_level(logging.DEBUG, logger=cpu_gemv.__name__):
        for _ in range(3):
            assert torch.equal(cpu_linear(x, w, b), F.linear(x, w, b))
        assert cpu_gemv.active_path() == "off"
    records = [r for r in caplog.records if r.name == cpu_gemv.__name__]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "aarch64" in records[0].getMessage()


def test_missing_gcc_logs_one_info_line_and_falls_back(
    tmp_path: Path, fresh: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    if not cpu_gemv.is_x86_64():
        pytest.skip("auto builds nothing on this machine")
    fresh.setenv("RUYIFLOW_CACHE", str(tmp_path))  # empty: nothing to load
    fresh.delenv(cpu_gemv.ENV_SWITCH, raising=False)
    fresh.setattr(cpu_gemv.shutil, "which", lambda name: None)
    x, w, b = inputs(96, 576, 2, torch.float32, bias=True)
    with caplog.at_level(logging.DEBUG, logger=cpu_gemv.__name__):
        for _ in range(3):
            assert torch.equal(cpu_linear(x, w, b), F.linear(x, w, b))
        assert not cpu_gemv.is_available()
    records = [r for r in caplog.records if r.name == cpu_gemv.__name__]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "gcc not found" in records[0].getMessage()


def test_build_cache_is_reused(path: str, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    library = cpu_gemv.library_path(cpu_gemv.build_for(path))
    assert library.parent == cache and library.name.startswith(f"cpu_gemv-{path}-")
    assert not list(cache.glob("*.tmp"))  # no temporary files left behind
    mtime = library.stat().st_mtime_ns

    def no_compiler(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt a cached library")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    cpu_gemv.reset()
    assert cpu_gemv.active_path() == path
    assert cpu_gemv.build(cpu_gemv.build_for(path)) == library
    assert library.stat().st_mtime_ns == mtime


def test_cache_names_builds_by_flags_not_by_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # A cache shared by machines holds one file per build; each CPU picks one its flags allow.
    names = {cpu_gemv.library_path(b).name for b in cpu_gemv.BUILDS}
    assert len(names) == len(cpu_gemv.BUILDS)
    avx2 = next(b for b in cpu_gemv.BUILDS if b.path == "avx2")
    here = cpu_gemv.library_path(avx2)
    monkeypatch.setattr(cpu_gemv, "cpu_flags", lambda: AVX2_ONLY)
    assert cpu_gemv.supported_paths() == ("avx2", "plain")
    assert cpu_gemv.build_for("avx2") == avx2 and cpu_gemv.library_path(avx2) == here
