"""Fused MoE experts: y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = ids[t, j].

Weights are stacked per expert: `w_gate_up` [E, 2I, H] (rows [0:I] gate, [I:2I] up) and `w_down`
[E, H, I]. A "slot" is one (token, choice) pair, slot = token * top_k + j.

Triton path (the vLLM/SGLang scheme, written here from the algorithm):
1. `moe_align_block_size`: sort slots by expert and pad each expert's segment to a multiple of
   BLOCK_M, so every BLOCK_M tile of slots belongs to a single expert;
2. `fused_moe_kernel` as GEMM1 over all experts in one launch: gathers x rows on load
   (row = slot // top_k), multiplies by the tile's expert's gate and up rows and applies
   silu(gate) * up in the epilogue → act [T*k, I];
3. the same kernel as GEMM2: act @ w_down[e]^T, times the routing weight, in float32 → [T*k, H];
4. sum over the k choices of each token, cast to x's dtype.
Accumulation is float32 throughout. For a handful of slots (decode) step 1 is skipped: each slot
gets a tile of its own (`ONE_SLOT_PER_TILE`, vLLM's naive block assignment), which saves the
alignment's small launches when they would cost more than the padding saves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ruyiflow.kernels.dispatch import cdiv, check_launchable, dot_upcast, triton_jit

# triton.language, bound by @triton_jit on the first launch (triton is imported lazily).
tl: Any = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton_jit
def fused_moe_kernel(
    a_ptr,  # GEMM1: x [T, H]; GEMM2: act [T*k, I]   (unit stride along K)
    b_ptr,  # GEMM1: w_gate_up [E, 2I, H]; GEMM2: w_down [E, H, I]   (unit stride along K)
    c_ptr,  # GEMM1: act [T*k, I]; GEMM2: y [T*k, H] float32
    topk_weights_ptr,  # [T*k] float32, indexed by slot
    sorted_slots_ptr,  # [num_blocks_m * BLOCK_M] int32, grouped by expert, padding = num_slots
    block_experts_ptr,  # [num_blocks_m] int32/64, the expert of each BLOCK_M tile
    num_padded_ptr,  # [1] int64, entries of sorted_slots in use
    num_slots,
    N,
    K,
    num_blocks_m,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    A_ROW_DIV: tl.constexpr,  # slot // A_ROW_DIV is the A row: top_k in GEMM1, 1 in GEMM2
    SWIGLU: tl.constexpr,  # B rows [n] and [N + n] are gate and up; store silu(gate) * up
    MUL_ROUTED_WEIGHT: tl.constexpr,
    DOT_F32: tl.constexpr,  # see dispatch.dot_upcast
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ONE_SLOT_PER_TILE: tl.constexpr,  # decode: tile m holds slot m alone, no alignment needed
):
    pid = tl.program_id(0)
    num_blocks_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles walk the same column tiles together so their B tiles are reused in L2.
    pids_per_group = GROUP_M * num_blocks_n
    first_m = (pid // pids_per_group) * GROUP_M
    group_m = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m
    if ONE_SLOT_PER_TILE:
        # block_experts_ptr is topk_ids itself; the other BLOCK_M - 1 rows are masked padding.
        slots = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_slots).to(tl.int64)
    else:
        if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
            return  # a tile past the last expert's padded segment
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(sorted_slots_ptr + offs_m).to(tl.int64)  # [BLOCK_M]
    slot_mask = slots < num_slots
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (slots // A_ROW_DIV)[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]  # [BK, BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=slot_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if SWIGLU:
            b_up = tl.load(
                b_ptrs + N * stride_bn, mask=k_mask[:, None] & n_mask[None, :], other=0.0
            )
            if DOT_F32:
                b_up = b_up.to(tl.float32)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if SWIGLU:
        acc = acc * tl.sigmoid(acc) * acc_up
    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_weights_ptr + slots, mask=slot_mask, other=0.0)
        acc = acc * w[:, None]
    c_ptrs = c_ptr + slots[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=slot_mask[:, None] & n_mask[None, :])


def moe_align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group slots by expert, each expert's segment padded to a multiple of `block_m`.

    Returns `sorted_slots` [num_blocks * block_m] int32 (padding holds the sentinel T*k),
    `block_experts` [num_blocks] int64 (tiles past the end hold `num_experts`) and
    `num_padded` [1] int64. Sizes are upper bounds known on the host, so nothing here waits
    for the device.
    """
    flat = topk_ids.reshape(-1).long()  # [S] expert of each slot
    num_slots = flat.numel()
    device = flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = padded.cumsum(0)  # [E]
    order = torch.argsort(flat, stable=True)  # [S] slots sorted by expert
    sorted_experts = flat[order]
    rank = torch.arange(num_slots, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    dest = (padded_end - padded)[sorted_experts] + rank  # [S] position in the padded layout
    # At most min(S, E) experts are active, each padding at most block_m - 1 rows.
    max_padded = num_slots + min(num_slots, num_experts) * (block_m - 1)
    num_blocks = cdiv(max_padded, block_m)
    sorted_slots = torch.full((num_blocks * block_m,), num_slots, dtype=torch.int32, device=device)
    sorted_slots[dest] = order.to(torch.int32)
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_end, block_starts, right=True)  # [num_blocks]
    return sorted_slots, block_experts, padded_end[-1:]


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    one_slot_per_tile: bool | None = None,
    validate_ids: bool = True,
) -> torch.Tensor:
    """Triton launcher: [T, H] in x's dtype. Keyword arguments override heuristics (for tests).

    `one_slot_per_tile` skips the alignment for a handful of slots (decode): each slot gets its
    own tile, at the price of re-reading an expert's weights if two slots share it.
    `validate_ids` checks that every id is in [0, E) (one device sync); turn it off only where
    the router is trusted, e.g. inside CUDA-graph capture.
    """
    check_fused_moe_args(x, w_gate_up, w_down, topk_weights, topk_ids)
    num_tokens, hidden = x.shape
    num_experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_slots = num_tokens * top_k
    if validate_ids and num_slots:
        lo, hi = (int(v) for v in topk_ids.aminmax())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"fused_moe: topk_ids span [{lo}, {hi}], outside [0, {num_experts})")
    if num_slots == 0:
        return torch.zeros_like(x)
    bm, bn, bk, group_m, num_warps = _pick_config(num_slots, num_experts)
    bm, bn, bk = block_m or bm, block_n or bn, block_k or bk
    if one_slot_per_tile is None:
        one_slot_per_tile = num_slots * 4 <= num_experts  # vLLM's threshold
    if one_slot_per_tile:
        sorted_slots = block_experts = num_padded = topk_ids.reshape(-1)  # [S]; see kernel
        num_blocks_m = num_slots
    else:
        sorted_slots, block_experts, num_padded = moe_align_block_size(topk_ids, bm, num_experts)
        num_blocks_m = block_experts.numel()
    act = torch.empty(num_slots, inter, dtype=x.dtype, device=x.device)
    y = torch.empty(num_slots, hidden, dtype=torch.float32, device=x.device)  # by slot
    weights = topk_weights.reshape(-1)  # [S] float32 (a copy if the rows were strided)

    def launch(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, **flags: object) -> None:
        n, k = b.shape[1] // (2 if flags["SWIGLU"] else 1), b.shape[2]
        fused_moe_kernel[(num_blocks_m * cdiv(n, bn),)](
            a,
            b,
            c,
            weights,
            sorted_slots,
            block_experts,
            num_padded,
            num_slots,
            n,
            k,
            num_blocks_m,
            a.stride(0),
            b.stride(0),
            b.stride(1),
            c.stride(0),
            DOT_F32=dot_upcast(x.dtype),
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else None,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=group_m,
            ONE_SLOT_PER_TILE=one_slot_per_tile,
            num_warps=num_warps,
            **flags,
        )

    launch(x, w_gate_up, act, A_ROW_DIV=top_k, SWIGLU=True, MUL_ROUTED_WEIGHT=False)
    launch(act, w_down, y, A_ROW_DIV=1, SWIGLU=False, MUL_ROUTED_WEIGHT=True)
    return y.view(num_tokens, top_k, hidden).sum(1).to(x.dtype)


def _pick_config(num_slots: int, num_experts: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps); vLLM's untuned defaults."""
    if num_slots <= num_experts:  # decode: about one slot per expert, tiles are mostly padding
        return 16, 64, 128, 1, 4
    return 64, 64, 64, 8, 4


def check_fused_moe_args(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    """Raise ValueError on shapes, dtypes, strides or devices the kernel cannot take."""
    tensors = (x, w_gate_up, w_down, topk_weights, topk_ids)
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError("fused_moe: all arguments must be torch tensors")
    if x.dim() != 2 or w_gate_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(
            f"fused_moe: expected x [T, H], w_gate_up [E, 2I, H], w_down [E, H, I]; got "
            f"{tuple(x.shape)}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}"
        )
    num_tokens, hidden = x.shape
    num_experts, two_inter, h_in = w_gate_up.shape
    if h_in != hidden or two_inter % 2 or two_inter == 0 or num_experts == 0:
        raise ValueError(
            f"fused_moe: w_gate_up {tuple(w_gate_up.shape)} is not [E, 2I, H={hidden}]"
        )
    if w_down.shape != (num_experts, hidden, two_inter // 2):
        raise ValueError(
            f"fused_moe: w_down {tuple(w_down.shape)} != [E, H, I] = "
            f"{(num_experts, hidden, two_inter // 2)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.shape[1] == 0:
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} is not [T={num_tokens}, k]")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"fused_moe: topk_weights {tuple(topk_weights.shape)} != topk_ids "
            f"{tuple(topk_ids.shape)}"
        )
    if x.dtype not in FLOAT_DTYPES or w_gate_up.dtype != x.dtype or w_down.dtype != x.dtype:
        raise ValueError(
            f"fused_moe: x and both weights must share one of float32/float16/bfloat16; got "
            f"{x.dtype}, {w_gate_up.dtype}, {w_down.dtype}"
        )
    if topk_weights.dtype != torch.float32:
        raise ValueError(f"fused_moe: topk_weights must be float32, got {topk_weights.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe: topk_ids must be int32 or int64, got {topk_ids.dtype}")
    if x.stride(1) != 1 or w_gate_up.stride(2) != 1 or w_down.stride(2) != 1:
        raise ValueError("fused_moe: x and the weights need unit stride along their last dim")
    check_launchable("fused_moe", *tensors)


def fused_moe_reference(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Plain torch: slots sorted by expert, one gate_up and one down matmul per active expert.

    Expert math runs in x's dtype like HF's per-expert MLP (matmuls accumulate in float32);
    the weighted combine is float32.
    """
    num_tokens, hidden = x.shape
    num_experts, inter = w_gate_up.shape[0], w_gate_up.shape[1] // 2
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)  # [S]
    order = torch.argsort(flat_ids, stable=True)  # [S] slots grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts)  # [E]
    active = counts.nonzero().flatten()  # [A] experts with at least one slot
    segments = zip(
        active.tolist(), counts.cumsum(0)[active].tolist(), counts[active].tolist(), strict=True
    )
    tokens = order // top_k  # [S] token of each sorted slot
    weights = topk_weights.reshape(-1)[order].to(torch.float32)  # [S]
    y = torch.empty(num_tokens * top_k, hidden, dtype=torch.float32, device=x.device)  # by slot
    for e, end, n in segments:
        seg = slice(end - n, end)
        gate_up = F.linear(x.index_select(0, tokens[seg]), w_gate_up[e])  # [n, 2I]
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        out = F.linear(act, w_down[e]).to(torch.float32) * weights[seg, None]  # [n, H]
        y.index_copy_(0, order[seg], out)
    return y.view(num_tokens, top_k, hidden).sum(1).to(x.dtype)
