"""Paged decode attention for DeepSeek-V3 multi-head latent attention (MLA), absorbed form:
every query head attends over one shared latent head, every sequence of a step in one launch.

    scores[b, h, t] = scale * (q_nope[b, h] . c_kv[b, t] + q_rope[b, h] . k_rope[b, t])
    out[b, h]       = softmax_t(scores[b, h]) @ c_kv[b]                  -> [B, H, R]

`q_lat [B, H, R + P]` is the query with W_UK already folded into its nope part (R =
kv_lora_rank, P = rope dims); the latent pages `[num_pages, PAGE, R + P]` hold [c_kv | k_rope]
per position (the runner's MLA cache). Each program takes one sequence and BLOCK_H query heads:
their scores over a tile of BLOCK_N positions are two `tl.dot`s (the latent part and the rope
part, so neither needs R + P padded to a power of 2), with an online softmax in float32.

`paged_mla_reference` gathers each sequence's pages and runs SDPA in float32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ruyiflow.kernels.dispatch import (
    cdiv,
    check_launchable,
    dot_upcast,
    next_power_of_2,
    triton_jit,
)
from ruyiflow.kernels.paged_attention import MIN_DOT, gather_pages

# triton.language, bound by @triton_jit on the first launch (triton is imported lazily).
tl: Any = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_H = 16


@triton_jit
def paged_mla_kernel(
    q_ptr,  # [B, H, R + P]
    latent_ptr,  # [NP, PAGE, R + P] pages (unit stride along the last axis)
    table_ptr,  # [rows, C] int32
    rows_ptr,  # [B] int32/int64
    lengths_ptr,  # [B] int32
    out_ptr,  # [B, H, R]
    scale,
    num_heads,
    stride_qb,
    stride_qh,
    stride_lp,
    stride_lt,
    stride_tr,
    stride_tc,
    stride_ob,
    stride_oh,
    RANK: tl.constexpr,
    ROPE: tl.constexpr,
    BLOCK_R: tl.constexpr,  # RANK padded to a power of 2
    BLOCK_P: tl.constexpr,  # ROPE padded to a power of 2 >= 16
    BLOCK_H: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,  # positions per tile; divides PAGE
    DOT_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = h < num_heads
    row = tl.load(rows_ptr + b).to(tl.int64)
    length = tl.load(lengths_ptr + b)
    r = tl.arange(0, BLOCK_R)
    p_ = tl.arange(0, BLOCK_P)
    r_mask = r < RANK
    p_mask = p_ < ROPE
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh
    q_nope = tl.load(q_base + r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    q_rope = tl.load(q_base + RANK + p_[None, :], mask=h_mask[:, None] & p_mask[None, :], other=0.0)
    if DOT_F32:
        q_nope = q_nope.to(tl.float32)
        q_rope = q_rope.to(tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_R], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(0, length, BLOCK_N):
        page = tl.load(table_ptr + row * stride_tr + (start // PAGE) * stride_tc).to(tl.int64)
        n_mask = start + n < length
        base = latent_ptr + page * stride_lp + (start % PAGE + n)[:, None] * stride_lt
        c_kv = tl.load(base + r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        k_rope = tl.load(
            base + RANK + p_[None, :], mask=n_mask[:, None] & p_mask[None, :], other=0.0
        )
        if DOT_F32:
            c_kv = c_kv.to(tl.float32)
            k_rope = k_rope.to(tl.float32)
        s = tl.dot(q_nope, tl.trans(c_kv), input_precision=DOT_PRECISION)
        s = tl.dot(q_rope, tl.trans(k_rope), s, input_precision=DOT_PRECISION) * scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        probs = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(probs, axis=1)
        acc = acc * alpha[:, None]
        acc = tl.dot(probs.to(c_kv.dtype), c_kv, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_offs = b.to(tl.int64) * stride_ob + h[:, None] * stride_oh + r[None, :]
    tl.store(
        out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & r_mask[None, :]
    )


def paged_mla(
    q_lat: torch.Tensor,
    latent_pages: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    rank: int,
) -> torch.Tensor:
    """Triton launcher: checks its inputs, returns the attention-weighted latents [B, H, rank]
    in q_lat's dtype."""
    _check(q_lat, latent_pages, table, rows, lengths, rank)
    batch, num_heads, width = q_lat.shape
    page = latent_pages.shape[1]
    out = q_lat.new_empty(batch, num_heads, rank)
    if batch == 0:
        return out
    paged_mla_kernel[(batch, cdiv(num_heads, BLOCK_H))](
        q_lat,
        latent_pages,
        table,
        rows,
        lengths,
        out,
        float(scale),
        num_heads,
        q_lat.stride(0),
        q_lat.stride(1),
        latent_pages.stride(0),
        latent_pages.stride(1),
        table.stride(0),
        table.stride(1),
        out.stride(0),
        out.stride(1),
        RANK=rank,
        ROPE=width - rank,
        BLOCK_R=max(MIN_DOT, next_power_of_2(rank)),
        BLOCK_P=max(MIN_DOT, next_power_of_2(width - rank)),
        BLOCK_H=BLOCK_H,
        PAGE=page,
        BLOCK_N=min(page, 32),
        DOT_F32=dot_upcast(q_lat.dtype),
        DOT_PRECISION="ieee" if q_lat.dtype == torch.float32 else None,
        num_warps=8,
    )
    return out


def _check(
    q_lat: torch.Tensor,
    latent_pages: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    rank: int,
) -> None:
    if q_lat.dim() != 3 or latent_pages.dim() != 3:
        raise ValueError(
            f"paged_mla: q_lat must be [B, H, R + P] and pages [NP, PAGE, R + P], got "
            f"{tuple(q_lat.shape)} and {tuple(latent_pages.shape)}"
        )
    batch, _, width = q_lat.shape
    page = latent_pages.shape[1]
    if latent_pages.shape[2] != width or not 0 < rank < width:
        raise ValueError(f"paged_mla: width {width} vs pages {latent_pages.shape[2]}, rank {rank}")
    if page < MIN_DOT or page & (page - 1):
        raise ValueError(f"paged_mla: page size {page} must be a power of 2 >= {MIN_DOT}")
    if q_lat.dtype not in FLOAT_DTYPES or latent_pages.dtype != q_lat.dtype:
        raise ValueError(f"paged_mla: dtypes {q_lat.dtype}, {latent_pages.dtype} must match")
    if q_lat.stride(2) != 1 or latent_pages.stride(2) != 1:
        raise ValueError("paged_mla: q_lat and pages need unit stride along the last axis")
    if table.dim() != 2 or table.dtype != torch.int32:
        raise ValueError("paged_mla: table must be [rows, pages] int32")
    if rows.shape != (batch,) or lengths.shape != (batch,) or lengths.dtype != torch.int32:
        raise ValueError(f"paged_mla: rows and lengths must be [{batch}] (lengths int32)")
    if rows.dtype not in (torch.int32, torch.int64):
        raise ValueError("paged_mla: rows must be int32 or int64")
    check_launchable("paged_mla", q_lat, latent_pages, table, rows, lengths)


def paged_mla_reference(
    q_lat: torch.Tensor,
    latent_pages: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    rank: int,
) -> torch.Tensor:
    """SDPA in float32 over each sequence's gathered latents (one key/value head shared by
    every query head); [B, H, rank] in q_lat's dtype."""
    batch, num_heads, _ = q_lat.shape
    out = q_lat.new_empty(batch, num_heads, rank)
    for b, (row, length) in enumerate(zip(rows.tolist(), lengths.tolist(), strict=True)):
        latent = gather_pages(latent_pages, table, row, length, axis=0).float()  # [L, R + P]
        o = F.scaled_dot_product_attention(
            q_lat[b, :, None].float()[None],  # [1, H, 1, R + P]
            latent[None, None],  # [1, 1, L, R + P]
            latent[None, None, :, :rank],
            scale=scale,
            enable_gqa=True,
        )
        out[b] = o[0, :, 0].to(q_lat.dtype)
    return out
