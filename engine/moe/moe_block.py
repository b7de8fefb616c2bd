"""The feed-forward block of an MoE decoder layer: a dense SwiGLU MLP (dots1 / DeepSeek-V3 layers
below `first_k_dense_replace`) or router + routed experts + shared experts.

    logits  = x.float() @ W_router.float()^T                       [T, E]   (router in fp32)
    weights, ids = kernels.route_experts(logits, top_k, ...)       softmax (Hunyuan) or sigmoid +
                                                                   correction bias, groups, scaling
    y = sum_j weights[:, j] * expert_{ids[:, j]}(x) + shared(x)    shared output never scaled

Routing is dropless. A shared expert of width n * I (I = one routed expert's width) is stored as n
extra "pseudo-experts" of width I appended to the stacked expert weights and always selected with
weight 1: SwiGLU acts per intermediate channel, so summing the halves' outputs is the whole MLP,
and the shared expert rides in the same grouped matmuls (and the same Triton launch on GPU).

CPU decode of a single token skips the sort-by-expert of `kernels.fused_moe`: its k + n experts
are each two matmuls on views of the stacked weights. Gathering their weights for one `torch.bmm`
was measured slower on CPU (the gather copies every selected weight before reading it again).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ruyiflow.engine.ops import linear
from ruyiflow.kernels import fused_moe, route_experts


@dataclass
class DenseFFN:
    w_gate_up: torch.Tensor  # [2I, hidden]; rows [0:I] gate, [I:2I] up
    w_down: torch.Tensor  # [hidden, I]

    def tensors(self) -> list[torch.Tensor]:
        return [self.w_gate_up, self.w_down]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.w_gate_up)  # [T, 2I]
        inter = gate_up.shape[-1] // 2
        return linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], self.w_down)


@dataclass(frozen=True)
class Routing:
    top_k: int
    scoring: str  # "softmax" | "sigmoid"
    renormalize: bool
    scaling: float  # routed_scaling_factor
    num_groups: int = 1
    topk_groups: int = 1


@dataclass
class MoEFFN:
    router: torch.Tensor  # [E, hidden] float32
    correction_bias: torch.Tensor | None  # [E] float32, steers selection only
    w_gate_up: torch.Tensor  # [E + S, 2I, hidden]: E routed experts, then S shared slices
    w_down: torch.Tensor  # [E + S, hidden, I]
    routing: Routing
    num_shared_slots: int  # S
    shared: DenseFFN | None = None  # a shared expert whose width is not a multiple of I

    def __post_init__(self) -> None:
        # per-expert (gate_up [2I, H], down [H, I]) views, indexed without a tensor op per use
        self.experts = list(zip(self.w_gate_up.unbind(0), self.w_down.unbind(0), strict=True))

    @property
    def num_experts(self) -> int:
        return self.w_gate_up.shape[0] - self.num_shared_slots

    def tensors(self) -> list[torch.Tensor]:
        out = [self.router, self.w_gate_up, self.w_down]
        out += [self.correction_bias] if self.correction_bias is not None else []
        return out + (self.shared.tensors() if self.shared is not None else [])

    def active_parameters(self) -> int:
        """Parameters one token touches: router, top-k routed experts, shared experts."""
        per_expert = self.w_gate_up[0].numel() + self.w_down[0].numel()
        count = self.router.numel() + per_expert * (self.routing.top_k + self.num_shared_slots)
        count += self.correction_bias.numel() if self.correction_bias is not None else 0
        return count + (sum(t.numel() for t in self.shared.tensors()) if self.shared else 0)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> routed (weights [T, k] float32, ids [T, k] int64)."""
        r = self.routing
        logits = linear(x.float(), self.router)  # [T, E] float32
        return route_experts(
            logits,
            r.top_k,
            scoring=r.scoring,
            correction_bias=self.correction_bias,
            renormalize=r.renormalize,
            routed_scaling_factor=r.scaling,
            num_groups=r.num_groups,
            topk_groups=r.topk_groups,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (post-attention-normed) -> [T, hidden]."""
        weights, ids = self.route(x)
        if x.shape[0] == 1 and not x.is_cuda:
            y = self._one_token(x, weights[0].tolist(), ids[0].tolist())
        else:
            if self.num_shared_slots:  # shared slices: always chosen, weight 1, ids E..E+S-1
                num_tokens, e = x.shape[0], self.num_experts
                shared = torch.arange(e, e + self.num_shared_slots, device=x.device)
                ids = torch.cat([ids, shared.expand(num_tokens, -1)], dim=1)
                weights = torch.cat([weights, weights.new_ones(num_tokens, shared.numel())], 1)
            # ids come from the router's top-k: in range, no device sync to check them
            y = fused_moe(x, self.w_gate_up, self.w_down, weights, ids, validate_ids=False)
        return y + self.shared(x) if self.shared is not None else y

    def _one_token(self, x: torch.Tensor, weights: list[float], ids: list[int]) -> torch.Tensor:
        """x [1, hidden]: sum_j w_j * expert_j(x) + shared slices, accumulated in float32."""
        inter = self.w_down.shape[-1]
        slots = zip(
            ids + list(range(self.num_experts, len(self.experts))),
            weights + [1.0] * self.num_shared_slots,
            strict=True,
        )
        y = None
        for e, weight in slots:
            w_gate_up, w_down = self.experts[e]
            gate_up = linear(x, w_gate_up)  # [1, 2I]
            out = linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w_down)  # [1, H]
            if y is None:
                y = out.float() * weight  # float32 accumulator
            else:
                y.add_(out, alpha=weight)
        return y.to(x.dtype)
