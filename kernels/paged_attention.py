"""Paged decode attention (GQA): one query row per sequence over its K/V pages, every sequence
of a step in one launch.

    out[b, h] = softmax(scale * q[b, h] . K_b[kvh(h)]^T) V_b[kvh(h)]     over positions 0..len_b-1

K/V live in pages `[num_pages, KVH, page_size, D]` (strided views of the runner's pool, unit
stride along D); sequence b's page of position p is `table[rows[b], p // page_size]`, where
`table` is one slot's `[num_rows, max_pages]` view of the runner's device block table. Each
program takes one (sequence, KV head): the group of query heads sharing that KV head is one
`[GROUP_P, D]` tile (padded to 16 rows for `tl.dot`), and the pages are walked in tiles of
BLOCK_N positions with an online softmax in float32 (flash-decoding without the split: one
launch per layer). Ragged lengths need no padding: each program stops at its own length.

`paged_attention_reference` gathers each sequence's pages into one tensor and runs SDPA in
float32: the oracle in tests and the path on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ruyiflow.kernels.dispatch import check_launchable, dot_upcast, next_power_of_2, triton_jit

# triton.language, bound by @triton_jit on the first launch (triton is imported lazily).
tl: Any = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_DOT = 16  # tl.dot needs every dimension >= 16


@triton_jit
def paged_attention_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [NP, KVH, PAGE, D] pages (unit stride along D)
    v_ptr,  # same shape and strides as k
    table_ptr,  # [R, C] int32: page of each row's position // PAGE
    rows_ptr,  # [B] int32/int64: the table row of each sequence
    lengths_ptr,  # [B] int32: positions to attend, the new one included
    out_ptr,  # [B, H, D]
    scale,
    stride_qb,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_kt,
    stride_tr,
    stride_tc,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_P: tl.constexpr,  # GROUP padded to a power of 2 >= 16
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of 2 >= 16
    PAGE: tl.constexpr,  # positions per page
    BLOCK_N: tl.constexpr,  # positions per tile; divides PAGE
    DOT_F32: tl.constexpr,  # see dispatch.dot_upcast
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    row = tl.load(rows_ptr + b).to(tl.int64)
    length = tl.load(lengths_ptr + b)
    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q_offs = b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_offs, mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(0, length, BLOCK_N):
        page = tl.load(table_ptr + row * stride_tr + (start // PAGE) * stride_tc).to(tl.int64)
        n_mask = start + n < length
        kv_offs = (
            page * stride_kp
            + kv_head * stride_kh
            + (start % PAGE + n)[:, None] * stride_kt
            + d[None, :]
        )
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # [GROUP_P, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_offs = b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
    tl.store(
        out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :]
    )


def paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton launcher: checks its inputs, returns out [B, H, D] in q's dtype."""
    _check(q, k_pages, v_pages, table, rows, lengths)
    batch, num_heads, head_dim = q.shape
    num_kv, page = k_pages.shape[1], k_pages.shape[2]
    group = num_heads // num_kv
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_n = min(page, 64)
    paged_attention_kernel[(batch, num_kv)](
        q,
        k_pages,
        v_pages,
        table,
        rows,
        lengths,
        out,
        float(scale),
        q.stride(0),
        q.stride(1),
        k_pages.stride(0),
        k_pages.stride(1),
        k_pages.stride(2),
        table.stride(0),
        table.stride(1),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_P=max(MIN_DOT, next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=max(MIN_DOT, next_power_of_2(head_dim)),
        PAGE=page,
        BLOCK_N=block_n,
        DOT_F32=dot_upcast(q.dtype),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=4,
    )
    return out


def _check(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
) -> None:
    check_paged_inputs("paged_attention", FLOAT_DTYPES, q, k_pages, v_pages, table)
    batch, page = q.shape[0], k_pages.shape[2]
    if page < MIN_DOT or page & (page - 1):
        raise ValueError(f"paged_attention: page size {page} must be a power of 2 >= {MIN_DOT}")
    if rows.shape != (batch,) or lengths.shape != (batch,):
        raise ValueError(f"paged_attention: rows and lengths must be [{batch}]")
    if rows.dtype not in (torch.int32, torch.int64) or lengths.dtype != torch.int32:
        raise ValueError("paged_attention: rows must be int32/int64 and lengths int32")
    check_launchable("paged_attention", q, k_pages, v_pages, table, rows, lengths)


def check_paged_inputs(
    name: str,
    dtypes: tuple[torch.dtype, ...],
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
) -> None:
    """The contract every paged GQA decode kernel shares (this one and `kernels.cpu_attention`):
    q [B, H, D] and pages [NP, KVH, PAGE, D] of one dtype from `dtypes`, unit stride along D, k
    and v pages of one shape and stride, H a multiple of KVH, table [R, W] int32."""
    if q.dim() != 3 or k_pages.dim() != 4:
        raise ValueError(
            f"{name}: q must be [B, H, D] and pages [NP, KVH, PAGE, D], got "
            f"{tuple(q.shape)} and {tuple(k_pages.shape)}"
        )
    num_heads, head_dim = q.shape[1:]
    num_kv, page_dim = k_pages.shape[1], k_pages.shape[3]
    if v_pages.shape != k_pages.shape or v_pages.stride() != k_pages.stride():
        raise ValueError(f"{name}: k and v pages must have one shape and one stride")
    if page_dim != head_dim or num_heads % num_kv:
        raise ValueError(
            f"{name}: {num_heads} query heads of {head_dim} over {num_kv} KV heads of "
            f"{page_dim}: heads must be a multiple of KV heads, dims equal"
        )
    if q.dtype not in dtypes or k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"{name}: q and pages must share one dtype ({names}), got {q.dtype}, "
            f"{k_pages.dtype}, {v_pages.dtype}"
        )
    if q.stride(2) != 1 or k_pages.stride(3) != 1:
        raise ValueError(f"{name}: q and pages need unit stride along the head dim")
    if table.dim() != 2 or table.dtype != torch.int32:
        raise ValueError(f"{name}: table must be [rows, pages] int32, got {table.dtype}")


def gather_pages(
    pages: torch.Tensor, table: torch.Tensor, row: int, length: int, axis: int
) -> torch.Tensor:
    """Positions 0..length-1 of one table row's pages, concatenated along `axis` (the position
    axis of one page, counted without the page axis)."""
    page = pages.shape[axis + 1]
    num = -(-length // page)
    ids = table[row, :num].long()
    return torch.cat(list(pages[ids].unbind(0)), dim=axis).narrow(axis, 0, length)


def paged_attention_reference(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """SDPA in float32 over each sequence's gathered pages; out [B, H, D] in q's dtype."""
    out = torch.empty_like(q)
    for b, (row, length) in enumerate(zip(rows.tolist(), lengths.tolist(), strict=True)):
        k = gather_pages(k_pages, table, row, length, axis=1).float()  # [KVH, L, D]
        v = gather_pages(v_pages, table, row, length, axis=1).float()
        o = F.scaled_dot_product_attention(
            q[b, :, None].float()[None], k[None], v[None], scale=scale, enable_gqa=True
        )  # [1, H, 1, D]
        out[b] = o[0, :, 0].to(q.dtype)
    return out
