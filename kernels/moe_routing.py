"""MoE router: scores → (optional) group-limited selection → top-k → renormalise → scale.

For router logits [T, E] (float32, the router runs in fp32 in every family we serve):

    scores = softmax(logits) | sigmoid(logits)
    select = scores + correction_bias            (bias steers the choice only)
    if num_groups > 1: group score = sum of the top-2 `select` in each group; keep the best
                       `topk_groups` groups, the other experts cannot be chosen
    ids     = top-k of `select`
    weights = scores[ids]                        (unbiased)
    if renormalize: weights /= max(sum(weights), 1e-20)
    weights *= routed_scaling_factor

Hunyuan-A13B: softmax, top-8 of 64, renormalize, scale 1.0. dots.llm1: sigmoid + bias, top-6 of
128, renormalize, scale 2.5. DeepSeek-V3 / JoyAI: the same with groups. Experts outside the kept
groups are excluded outright (vLLM's -inf fill; HF fills 0.0, which differs only when biased
scores go negative). Returns `(topk_weights [T, k] float32, topk_ids [T, k] int64)`; the order
within a row is by descending `select` but callers must not rely on it (ties break differently
across implementations).
"""

from __future__ import annotations

from typing import Any

import torch

from ruyiflow.kernels.dispatch import check_launchable, next_power_of_2, triton_jit

# triton.language, bound by @triton_jit on the first launch (triton is imported lazily).
tl: Any = None

SCORINGS = ("softmax", "sigmoid")


@triton_jit
def route_experts_kernel(
    logits_ptr,  # [T, E] float32, unit stride along E
    bias_ptr,  # [E] float32 (unused without HAS_BIAS)
    weights_ptr,  # [T, TOP_K] float32
    ids_ptr,  # [T, TOP_K] int64
    E,
    stride_row,
    scaling,
    TOP_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    neg_inf = float("-inf")
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    x = tl.load(logits_ptr + row * stride_row + offs, mask=valid, other=neg_inf).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(x)
    else:
        e = tl.exp(x - tl.max(x, axis=0))
        scores = e / tl.sum(e, axis=0)
    select = scores
    if HAS_BIAS:
        select = select + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    select = tl.where(valid, select, neg_inf)
    if NUM_GROUPS > 1:
        group_size = E // NUM_GROUPS
        group_of = offs // group_size
        g_offs = tl.arange(0, BLOCK_G)
        group_score = tl.full([BLOCK_G], neg_inf, tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_group = tl.where(group_of == g, select, neg_inf)
            best = tl.argmax(in_group, axis=0)
            first = tl.max(in_group, axis=0)
            second = tl.max(tl.where(offs == best, neg_inf, in_group), axis=0)
            # Sum of the group's top two (just the top one for groups of a single expert).
            score = tl.where(second == neg_inf, first, first + second)
            group_score = tl.where(g_offs == g, score, group_score)
        keep = offs < 0  # all False
        for _ in tl.static_range(TOPK_GROUPS):
            g_best = tl.argmax(group_score, axis=0)
            keep = keep | (group_of == g_best)
            group_score = tl.where(g_offs == g_best, neg_inf, group_score)
        select = tl.where(keep, select, neg_inf)
    k_offs = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int64)
    for j in tl.static_range(TOP_K):
        best = tl.argmax(select, axis=0)
        w = tl.sum(tl.where(offs == best, scores, 0.0), axis=0)
        top_w = tl.where(k_offs == j, w, top_w)
        top_i = tl.where(k_offs == j, best.to(tl.int64), top_i)
        select = tl.where(offs == best, neg_inf, select)
    if RENORMALIZE:
        top_w = top_w / tl.maximum(tl.sum(top_w, axis=0), 1e-20)
    k_mask = k_offs < TOP_K
    tl.store(weights_ptr + row * TOP_K + k_offs, top_w * scaling, mask=k_mask)
    tl.store(ids_ptr + row * TOP_K + k_offs, top_i, mask=k_mask)


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
    """Triton launcher: one program per token (see module docstring for the math)."""
    check_routing_args(router_logits, top_k, scoring, correction_bias, num_groups, topk_groups)
    if router_logits.stride(1) != 1:
        raise ValueError("route_experts: router_logits must have unit stride along experts")
    tensors = [router_logits] + ([correction_bias] if correction_bias is not None else [])
    check_launchable("route_experts", *tensors)
    num_tokens, num_experts = router_logits.shape
    device = router_logits.device
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return weights, ids
    route_experts_kernel[(num_tokens,)](
        router_logits,
        correction_bias if correction_bias is not None else router_logits,
        weights,
        ids,
        num_experts,
        router_logits.stride(0),
        float(routed_scaling_factor),
        TOP_K=top_k,
        SIGMOID=scoring == "sigmoid",
        HAS_BIAS=correction_bias is not None,
        RENORMALIZE=bool(renormalize),
        NUM_GROUPS=num_groups,
        TOPK_GROUPS=topk_groups,
        BLOCK_E=next_power_of_2(num_experts),
        BLOCK_K=next_power_of_2(top_k),
        BLOCK_G=next_power_of_2(num_groups),
    )
    return weights, ids


def check_routing_args(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str,
    correction_bias: torch.Tensor | None,
    num_groups: int,
    topk_groups: int,
) -> None:
    """Raise ValueError on arguments that neither implementation can honour."""
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError("route_experts: router_logits must be a [T, E] tensor")
    if router_logits.dtype != torch.float32:
        raise ValueError(f"route_experts: router_logits must be float32, got {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    if scoring not in SCORINGS:
        raise ValueError(f"route_experts: scoring {scoring!r} is not one of {SCORINGS}")
    if num_groups < 1 or num_experts % num_groups:
        raise ValueError(
            f"route_experts: {num_experts} experts do not split into {num_groups} groups"
        )
    if not 1 <= topk_groups <= num_groups:
        raise ValueError(f"route_experts: topk_groups {topk_groups} not in [1, {num_groups}]")
    if not 1 <= top_k <= topk_groups * (num_experts // num_groups):
        raise ValueError(
            f"route_experts: top_k {top_k} not in [1, {topk_groups * (num_experts // num_groups)}]"
            f" ({num_experts} experts, {topk_groups} of {num_groups} groups kept)"
        )
    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor) or correction_bias.shape != (num_experts,):
            raise ValueError(f"route_experts: correction_bias must have shape ({num_experts},)")
        if correction_bias.dtype != torch.float32 or not correction_bias.is_contiguous():
            raise ValueError("route_experts: correction_bias must be contiguous float32")
        if correction_bias.device != router_logits.device:
            raise ValueError("route_experts: correction_bias is on another device than the logits")


def route_experts_reference(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    correction_bias: torch.Tensor | None = None,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    num_groups: int = 1,
    topk_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, vectorised over tokens."""
    check_routing_args(router_logits, top_k, scoring, correction_bias, num_groups, topk_groups)
    if scoring == "softmax":
        scores = router_logits.softmax(dim=-1)  # [T, E]
    else:
        scores = router_logits.sigmoid()
    select = scores + correction_bias if correction_bias is not None else scores
    if num_groups > 1:
        num_tokens, num_experts = select.shape
        grouped = select.view(num_tokens, num_groups, num_experts // num_groups)
        group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, G]
        kept = group_score.topk(topk_groups, dim=-1).indices  # [T, topk_groups]
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        select = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(select)
    ids = select.topk(top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids
