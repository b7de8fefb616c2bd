"""CPU paged decode attention: `cpu_paged_attention` is `paged_attention` (the Triton kernel's
contract) through `kernels/cpu_paged_attention.c`, for every decode row of a step in one call per
layer, optionally storing each row's new K/V first.

It lives in the CPU GEMV's library and follows its path (`RUYIFLOW_CPU_GEMV`: avx512, avx2, plain
or off). `RUYIFLOW_CPU_ATTENTION=off` turns this kernel alone off (the engine then attends per
sequence over block views, `engine.kv_blocks`); `is_available()` says whether it runs. Inputs
are checked here (shapes, dtypes, strides) and every table row, length and page id in C before
anything is written; a violation raises ValueError, never reads outside the tensors.

The paged reference (`kernels.paged_attention.paged_attention_reference`) is the oracle in tests.
"""

from __future__ import annotations

import ctypes
import os

import torch

from ruyiflow.kernels import cpu_gemv
from ruyiflow.kernels.paged_attention import check_paged_inputs

ENV_SWITCH = "RUYIFLOW_CPU_ATTENTION"
DTYPES = (torch.float32, torch.bfloat16)


def is_available() -> bool:
    """Whether the C kernel runs: not switched off, and the CPU library loaded."""
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if value in ("off", "0"):
        return False
    if value not in ("", "1", "auto", "on"):
        raise ValueError(f"{ENV_SWITCH}={value!r}: expected auto or off")
    return cpu_gemv.attention_kernel() is not None


def cpu_paged_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, D] (unit stride along D), pages [NP, KVH, PAGE, D] (k and v one shape and
    stride), table [R, W] int32 (unit stride along W), rows/lengths [B] int32 -> out [B, H, D]
    in q's dtype. With k_new/v_new [B, KVH, D], each is stored at position lengths[b] - 1 first.
    Raises RuntimeError when the kernel is not loaded (see `is_available`)."""
    kernel = cpu_gemv.attention_kernel()
    if kernel is None:
        raise RuntimeError("the CPU attention kernel is not loaded (RUYIFLOW_CPU_GEMV=off?)")
    _check(q, k_pages, v_pages, table, rows, lengths, k_new, v_new)
    batch, num_heads, head_dim = q.shape
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype)
    if batch == 0:
        return out
    store = k_new is not None
    strides = (ctypes.c_int64 * 10)(
        q.stride(0),
        q.stride(1),
        k_new.stride(0) if store else 0,
        k_new.stride(1) if store else 0,
        v_new.stride(0) if store else 0,
        v_new.stride(1) if store else 0,
        *k_pages.stride()[:3],
        table.stride(0),
    )
    num_pages, num_kv, page, _ = k_pages.shape
    dims = (ctypes.c_int32 * 8)(
        batch, num_heads, num_kv, head_dim, page, table.shape[0], table.shape[1], num_pages
    )
    rc = kernel(
        q.dtype is torch.bfloat16,
        q.data_ptr(),
        k_new.data_ptr() if store else None,
        v_new.data_ptr() if store else None,
        k_pages.data_ptr(),
        v_pages.data_ptr(),
        table.data_ptr(),
        rows.data_ptr(),
        lengths.data_ptr(),
        out.data_ptr(),
        strides,
        dims,
        scale,
        cpu_gemv.thread_count(),
    )
    if rc == -2:
        raise MemoryError("cpu_paged_attention: no memory for the score buffer")
    if rc != 0:
        raise ValueError(
            "cpu_paged_attention: a row, length or page id is outside the table or the pages"
        )
    return out


def _check(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
) -> None:
    tensors = (q, k_pages, v_pages, table, rows, lengths, k_new, v_new)
    if any(t is not None and not t.is_cpu for t in tensors):
        raise ValueError("cpu_paged_attention: every tensor must be on the CPU")
    check_paged_inputs("cpu_paged_attention", DTYPES, q, k_pages, v_pages, table)
    batch, _, head_dim = q.shape
    num_kv = k_pages.shape[1]
    if table.stride(1) != 1:
        raise ValueError("cpu_paged_attention: table needs unit stride along its pages")
    for name, t in (("rows", rows), ("lengths", lengths)):
        if t.shape != (batch,) or t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"cpu_paged_attention: {name} must be [{batch}] contiguous int32")
    if (k_new is None) != (v_new is None):
        raise ValueError("cpu_paged_attention: give both k_new and v_new, or neither")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t is not None and (
            t.shape != (batch, num_kv, head_dim) or t.dtype != q.dtype or t.stride(2) != 1
        ):
            raise ValueError(
                f"cpu_paged_attention: {name} must be [{batch}, {num_kv}, {head_dim}] "
                f"{q.dtype} with unit stride along the head dim"
            )
