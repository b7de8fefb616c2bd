"""Small ops of the decode hot path, shared by every family, each the kernel call beside a
faster CPU form.

On CPU a decode step is a few hundred tiny ops, so their count matters as much as the weight
streaming: `linear` is `kernels.cpu_gemv.cpu_linear` (the C GEMV for decode-sized rows, `F.linear`
otherwise; `RUYIFLOW_CPU_GEMV=off` turns it off), and float32 RMSNorms on CPU are torch's one-op
`F.rms_norm` (equal to `kernels.rms_norm` in float32, which computes in float32 anyway) instead of
the reference's nine. Other dtypes and CUDA tensors take `kernels.rms_norm`, exact to HF's
round-before-weight order, fused with the residual add, and Triton on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ruyiflow.kernels import rms_norm
from ruyiflow.kernels.cpu_gemv import cpu_linear as linear

__all__ = ["head_rms", "linear", "rms", "rms_residual"]


def _fast(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and weight.dtype == torch.float32 and not x.is_cuda


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm of x [..., D] with weight [D]."""
    if _fast(x, weight):
        return F.rms_norm(x, weight.shape, weight, eps)
    return rms_norm(x, weight, eps)[0]


def rms_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x), residual + x): a pre-norm layer's residual step."""
    if _fast(x, weight):
        h = residual + x
        return F.rms_norm(h, weight.shape, weight, eps), h
    return rms_norm(x, weight, eps, residual=residual)


def head_rms(
    qk: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int, eps: float
) -> torch.Tensor:
    """Per-head RMSNorm of qk [N, H + KVH, D]: q heads with q_weight [D], k heads with k_weight."""
    if _fast(qk, q_weight):
        out = F.rms_norm(qk, qk.shape[-1:], None, eps)
        out[:, :num_heads] *= q_weight
        out[:, num_heads:] *= k_weight
        return out
    q = rms_norm(qk[:, :num_heads].contiguous(), q_weight, eps)[0]
    k = rms_norm(qk[:, num_heads:].contiguous(), k_weight, eps)[0]
    return torch.cat([q, k], dim=1)
