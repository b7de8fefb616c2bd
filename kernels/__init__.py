"""Kernels: each op is a Triton kernel beside its torch reference; these entry points pick one.

    rms_norm(x, weight, eps, residual=None) -> (out, h)
    exit_confidence(logits) -> (max_prob, margin, entropy)
    route_experts(router_logits, top_k, ...) -> (topk_weights, topk_ids)
    fused_moe(x, w_gate_up, w_down, topk_weights, topk_ids) -> out

Each call goes to the Triton launcher when `use_triton` says so (CUDA tensors, or the CPU
interpreter when forced, see `kernels.dispatch`) and to the reference otherwise; the references
are vectorised torch and serve the CPU hot path. The per-op launchers and references are
re-exported under `<op>_triton` / `<op>_reference`. Note that `kernels.exit_confidence` and
`kernels.fused_moe` name these functions, not the submodules: import from the submodules with
`from kernels.fused_moe import ...`.
"""

from __future__ import annotations

import torch

from ruyiflow.kernels.dispatch import has_triton, kernel_mode, use_triton
from ruyiflow.kernels.exit_confidence import exit_confidence as exit_confidence_triton
from ruyiflow.kernels.exit_confidence import exit_confidence_reference
from ruyiflow.kernels.fused_moe import fused_moe as fused_moe_triton
from ruyiflow.kernels.fused_moe import fused_moe_reference, moe_align_block_size
from ruyiflow.kernels.moe_routing import route_experts as route_experts_triton
from ruyiflow.kernels.moe_routing import route_experts_reference
from ruyiflow.kernels.rmsnorm import rmsnorm as rmsnorm_triton
from ruyiflow.kernels.rmsnorm import rmsnorm_reference

__all__ = [
    "exit_confidence",
    "exit_confidence_reference",
    "exit_confidence_triton",
    "fused_moe",
    "fused_moe_reference",
    "fused_moe_triton",
    "has_triton",
    "kernel_mode",
    "moe_align_block_size",
    "rms_norm",
    "rmsnorm_reference",
    "rmsnorm_triton",
    "route_experts",
    "route_experts_reference",
    "route_experts_triton",
    "use_triton",
]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF RMSNorm of `x (+ residual)`; returns `(out, h)` with `h = x + residual` (or `x`)."""
    if use_triton(x):
        res = residual.contiguous() if residual is not None else None
        return rmsnorm_triton(x.contiguous(), weight.contiguous(), eps, res)
    return rmsnorm_reference(x, weight, eps, residual)


def exit_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(max probability, top-2 margin, entropy), float32 [B] each, for logits [B, V]."""
    if use_triton(logits):
        return exit_confidence_triton(logits)
    return exit_confidence_reference(logits)


def route_experts(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MoE routing (see `kernels.moe_routing`): (topk_weights [T, k] f32, topk_ids [T, k] i64)."""
    impl = route_experts_triton if use_triton(router_logits) else route_experts_reference
    return impl(
        router_logits,
        top_k,
        scoring=scoring,
        correction_bias=correction_bias,
        renormalize=renormalize,
        routed_scaling_factor=routed_scaling_factor,
        num_groups=num_groups,
        topk_groups=topk_groups,
    )


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    validate_ids: bool = True,
) -> torch.Tensor:
    """Routed experts' output [T, H] in x's dtype: sum_j w[t, j] * expert_{ids[t, j]}(x[t]).
    `validate_ids=False` skips the Triton path's range check of the ids (a device sync): for
    ids straight from the router, e.g. in a served step or a CUDA graph."""
    if use_triton(x):
        return fused_moe_triton(
            x, w_gate_up, w_down, topk_weights, topk_ids, validate_ids=validate_ids
        )
    return fused_moe_reference(x, w_gate_up, w_down, topk_weights, topk_ids)
