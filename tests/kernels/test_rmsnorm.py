"""RMSNorm + residual: reference vs HF (bitwise), Triton (interpreter) vs reference, checks."""

from __future__ import annotations

import sys

import pytest
import torch

from ruyiflow import kernels
from ruyiflow.kernels.rmsnorm import rmsnorm, rmsnorm_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [(1, 64), (3, 100), (2, 5, 96), (37, 257)]


def hf_rmsnorm_classes() -> list[type]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    return [LlamaRMSNorm, Qwen2RMSNorm]


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    residual = torch.randn(shape, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_fp32", [False, True])
def test_reference_is_bitwise_hf(dtype: torch.dtype, weight_fp32: bool) -> None:
    x, residual, weight = inputs((4, 7, 96), dtype)
    if weight_fp32:
        weight = weight.float()  # HF keeps norm weights in fp32 in some loaders: output is fp32
    for cls in hf_rmsnorm_classes():
        norm = cls(96, eps=1e-6)
        norm.weight.data = weight.clone()
        with torch.no_grad():
            hidden = residual + x  # HF: hidden_states = residual + hidden_states
            expected = norm(hidden)
        out, h = rmsnorm_reference(x, weight, 1e-6, residual)
        assert torch.equal(h, hidden)
        assert out.dtype == expected.dtype
        assert torch.equal(out, expected), cls.__name__
        out_plain, h_plain = rmsnorm_reference(hidden, weight, 1e-6)
        assert h_plain is hidden and torch.equal(out_plain, expected)


def test_reference_matches_written_out_formula() -> None:
    x, residual, weight = inputs((5, 33), torch.float64)
    out, h = rmsnorm_reference(x.float(), weight.float(), 1e-5, residual.float())
    for r in range(5):
        row = [float(a) + float(b) for a, b in zip(x[r], residual[r], strict=True)]
        inv = (sum(v * v for v in row) / len(row) + 1e-5) ** -0.5
        expected = torch.tensor([v * inv * float(w) for v, w in zip(row, weight, strict=True)])
        torch.testing.assert_close(out[r].double(), expected.double(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h[r].double(), torch.tensor(row).double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_matches_reference(shape, dtype, with_residual, assert_close) -> None:
    x, residual, weight = inputs(shape, dtype, seed=len(shape) + shape[-1])
    res = residual if with_residual else None
    out, h = rmsnorm(x, weight, 1e-6, res)
    ref_out, ref_h = rmsnorm_reference(x, weight, 1e-6, res)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert_close(out, ref_out, dtype)
    assert_close(h, ref_h, dtype)
    if dtype != torch.bfloat16:  # bf16: the interpreter truncates its casts (see conftest)
        assert torch.equal(h, ref_h)
    if dtype == torch.float16:
        # Rounding to the input dtype before the weight multiply (HF's order) is visible here:
        # numpy rounds float32 -> float16 to nearest like torch, so nearly every value is equal.
        assert (out == ref_out).float().mean() > 0.99
    if not with_residual:
        assert h is x


def test_triton_mixed_weight_dtype_and_empty(assert_close) -> None:
    x, residual, weight = inputs((6, 80), torch.bfloat16)
    out, _ = rmsnorm(x, weight.float(), 1e-5, residual)
    ref, _ = rmsnorm_reference(x, weight.float(), 1e-5, residual)
    assert out.dtype == torch.float32
    assert_close(out, ref, torch.bfloat16)
    empty = torch.empty(0, 80, dtype=torch.bfloat16)
    out, h = rmsnorm(empty, weight, 1e-5)
    assert out.shape == (0, 80) and h is empty


def test_public_function_dispatch(monkeypatch, triton_path) -> None:
    x, residual, weight = inputs((3, 5, 64), torch.float32)
    calls = []
    monkeypatch.setattr(kernels, "rmsnorm_triton", lambda *a: calls.append(a) or rmsnorm(*a))
    x_t = x.transpose(0, 1)  # non-contiguous: the public function copies before launching
    out, h = kernels.rms_norm(x_t, weight, 1e-6, residual.transpose(0, 1))
    ref, ref_h = rmsnorm_reference(x_t, weight, 1e-6, residual.transpose(0, 1))
    assert len(calls) == 1
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h, ref_h)
    monkeypatch.setenv("RUYIFLOW_KERNELS", "reference")
    kernels.rms_norm(x, weight, 1e-6)
    monkeypatch.setenv("RUYIFLOW_KERNELS", "auto")  # auto never interprets on CPU
    kernels.rms_norm(x, weight, 1e-6)
    assert len(calls) == 1
    monkeypatch.setenv("RUYIFLOW_KERNELS", "fast")
    with pytest.raises(ValueError, match="RUYIFLOW_KERNELS"):
        kernels.rms_norm(x, weight, 1e-6)


def test_missing_triton_falls_back_to_reference(monkeypatch, triton_path) -> None:
    from ruyiflow.kernels import dispatch

    x, _, weight = inputs((2, 64), torch.float32)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    dispatch.has_triton.cache_clear()
    try:
        assert not dispatch.use_triton(x)
        out, _ = kernels.rms_norm(x, weight, 1e-6)
        assert torch.equal(out, rmsnorm_reference(x, weight, 1e-6)[0])
        with pytest.raises(ValueError, match="not importable"):
            rmsnorm(x, weight, 1e-6)
    finally:
        dispatch.has_triton.cache_clear()


def _bad_inputs():
    x, residual, weight = inputs((4, 64), torch.float32)
    return [
        ((x, weight[:32], 1e-6, None), "weight shape"),
        ((x.int(), weight, 1e-6, None), "dtypes"),
        ((x, weight.double(), 1e-6, None), "dtypes"),
        ((x.t(), torch.ones(4), 1e-6, None), "contiguous"),
        ((x, weight, -1.0, None), "eps"),
        ((x, weight, 1e-6, residual[:2]), "residual"),
        ((x, weight, 1e-6, residual.half()), "residual"),
        ((torch.empty(2, 0), weight, 1e-6, None), "non-empty"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_inputs())))
def test_launcher_rejects_bad_inputs(case: int) -> None:
    args, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        rmsnorm(*args)


def test_launcher_needs_cuda_or_interpreter(monkeypatch) -> None:
    x, _, weight = inputs((2, 64), torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="CUDA"):
        rmsnorm(x, weight, 1e-6)


def test_kernel_compiles_for_hopper(sm90_compile) -> None:
    jobs = []
    for dtype, residual in [("bf16", True), ("fp16", False), ("fp32", True)]:
        ptr = f"*{dtype}"
        signature = {"x_ptr": ptr, "res_ptr": ptr, "w_ptr": ptr, "out_ptr": ptr, "h_ptr": ptr}
        signature |= {"H": "i32", "eps": "fp32"}
        constexprs = {"HAS_RESIDUAL": residual, "BLOCK_H": 4096}
        jobs.append(
            dict(
                module="ruyiflow.kernels.rmsnorm",
                kernel="rmsnorm_kernel",
                signature=signature,
                constexprs=constexprs,
                options={"num_warps": 8},
            )
        )
    sm90_compile(jobs)
