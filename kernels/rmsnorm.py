"""RMSNorm fused with the residual add that precedes it in a pre-norm decoder.

Semantics are Hugging Face Llama/Qwen2 `RMSNorm` after `hidden_states = residual + hidden_states`:

    h   = x + residual                       (in x's dtype; h = x without a residual)
    out = (h.float() * rsqrt(mean(h.float()^2) + eps)).to(x.dtype) * weight

The cast back to x's dtype comes before the weight multiply, so the result has the dtype
`torch.promote_types(x.dtype, weight.dtype)`, exactly as HF's `weight * hidden.to(input_dtype)`.
Returns `(out, h)`; `h` is the new residual stream.
"""

from __future__ import annotations

from typing import Any

import torch

from ruyiflow.kernels.dispatch import check_launchable, next_power_of_2, triton_jit

# triton.language, bound by @triton_jit on the first launch (triton is imported lazily).
tl: Any = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton_jit
def rmsnorm_kernel(
    x_ptr,  # [R, H] rows of the input
    res_ptr,  # [R, H] residual rows (unused without HAS_RESIDUAL)
    w_ptr,  # [H]
    out_ptr,  # [R, H] in promote(x, weight) dtype
    h_ptr,  # [R, H] x + residual (unused without HAS_RESIDUAL)
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(x_ptr + row * H + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * H + offs, mask=mask, other=0.0)
        # torch adds half-precision tensors in float32 and rounds once; do the same.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * H + offs, x, mask=mask)
    hf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hf * hf, axis=0) / H + eps)
    # Round to the input dtype first (HF order), then multiply by the weight in the output dtype;
    # a product of two values of at most 24-bit mantissa each rounds once from float32.
    normed = (hf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * H + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher: checks its inputs, returns `(out, h)` (see module docstring)."""
    _check(x, weight, eps, residual)
    hidden = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    h = torch.empty_like(x) if residual is not None else x
    num_rows = x.numel() // hidden
    if num_rows == 0:
        return out, h
    block_h = next_power_of_2(hidden)
    rmsnorm_kernel[(num_rows,)](
        x,
        residual if residual is not None else x,
        weight,
        out,
        h,
        hidden,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK_H=block_h,
        num_warps=min(max(block_h // 512, 1), 16),
    )
    return out, h


def _check(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise ValueError("rmsnorm: x and weight must be torch tensors")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"rmsnorm: x must have a non-empty last dimension, got {tuple(x.shape)}")
    hidden = x.shape[-1]
    if hidden > 65536:
        raise ValueError(f"rmsnorm: hidden size {hidden} > 65536 does not fit one block")
    if weight.shape != (hidden,):
        raise ValueError(f"rmsnorm: weight shape {tuple(weight.shape)} != ({hidden},)")
    if x.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"rmsnorm: dtypes must be float32/float16/bfloat16, got x {x.dtype}, "
            f"weight {weight.dtype}"
        )
    if not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError("rmsnorm: x and weight must be contiguous (call .contiguous())")
    if not isinstance(eps, (int, float)) or not eps >= 0.0:
        raise ValueError(f"rmsnorm: eps must be a non-negative number, got {eps!r}")
    tensors = [x, weight]
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise ValueError("rmsnorm: residual must be a torch tensor or None")
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"rmsnorm: residual {tuple(residual.shape)} {residual.dtype} must match "
                f"x {tuple(x.shape)} {x.dtype}"
            )
        if not residual.is_contiguous():
            raise ValueError("rmsnorm: residual must be contiguous (call .contiguous())")
        tensors.append(residual)
    check_launchable("rmsnorm", *tensors)


def rmsnorm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, bitwise the HF Llama/Qwen2 RMSNorm formula; any device, any strides."""
    h = x + residual if residual is not None else x
    hf = h.to(torch.float32)
    variance = hf.pow(2).mean(-1, keepdim=True)
    hf = hf * torch.rsqrt(variance + eps)
    return weight * hf.to(h.dtype), h
