"""Paged decode attention (GQA and MLA): Triton (interpreter) vs SDPA on gathered pages, across
page edges and ragged lengths; the reference vs attention on the contiguous K/V the pages were
filled from; launcher checks; ahead-of-time compilation for sm_90."""

from __future__ import annotations

import pytest
import torch

from ruyiflow.kernels.paged_attention import paged_attention, paged_attention_reference
from ruyiflow.kernels.paged_mla import paged_mla, paged_mla_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def scattered(contiguous: list[torch.Tensor], page: int, num_pages: int, axis: int, seed: int):
    """Pages [NP, ...page shape] holding each sequence's contiguous tensor (positions along
    `axis`) at random distinct pages, and the table [B, max pages] int32 that finds them."""
    gen = torch.Generator().manual_seed(seed)
    first = contiguous[0]
    shape = list(first.shape)
    shape[axis] = page
    pages = torch.randn(num_pages, *shape, generator=gen).to(first.dtype)  # garbage elsewhere
    order = torch.randperm(num_pages - 1, generator=gen) + 1  # page 0 is never handed out
    width = max(-(-t.shape[axis] // page) for t in contiguous)
    table = torch.zeros(len(contiguous), width, dtype=torch.int32)
    used = 0
    for b, t in enumerate(contiguous):
        for j in range(-(-t.shape[axis] // page)):
            part = t.narrow(axis, j * page, min(page, t.shape[axis] - j * page))
            pages[order[used]].narrow(axis, 0, part.shape[axis]).copy_(part)
            table[b, j] = order[used]
            used += 1
    return pages, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_heads", "num_kv", "head_dim", "page", "lengths"),
    [
        (4, 4, 16, 16, [1, 16, 17]),  # MHA; page edges
        (6, 2, 24, 16, [5, 33, 48, 2]),  # group 3, head_dim padded to 32
        (7, 1, 64, 32, [64, 65, 3]),  # Ruyi-7B's group of 7 query heads
        (8, 2, 128, 64, [130, 1]),
    ],
)
def test_gqa_matches_reference(
    triton_path, assert_close, dtype, num_heads, num_kv, head_dim, page, lengths
) -> None:
    gen = torch.Generator().manual_seed(len(lengths) * head_dim)
    k = [torch.randn(num_kv, n, head_dim, generator=gen).to(dtype) for n in lengths]
    v = [torch.randn(num_kv, n, head_dim, generator=gen).to(dtype) for n in lengths]
    k_pages, table = scattered(k, page, 24, axis=1, seed=1)
    v_pages, v_table = scattered(v, page, 24, axis=1, seed=1)
    assert torch.equal(table, v_table)
    rows = torch.arange(len(lengths) - 1, -1, -1)  # rows need not follow the batch order
    table = table.flip(0).contiguous()
    q = torch.randn(len(lengths), num_heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    scale = head_dim**-0.5
    got = paged_attention(q, k_pages, v_pages, table, rows, lens, scale)
    want = paged_attention_reference(q, k_pages, v_pages, table, rows, lens, scale)
    assert_close(got, want, dtype, scale=4.0)


def test_gqa_reference_equals_contiguous_attention() -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 40]
    k = [torch.randn(2, n, 8, generator=gen) for n in lengths]
    v = [torch.randn(2, n, 8, generator=gen) for n in lengths]
    k_pages, table = scattered(k, 16, 12, axis=1, seed=5)
    v_pages, _ = scattered(v, 16, 12, axis=1, seed=5)
    q = torch.randn(2, 4, 8, generator=gen)
    got = paged_attention_reference(
        q, k_pages, v_pages, table, torch.arange(2), torch.tensor(lengths, dtype=torch.int32), 0.5
    )
    for b in range(2):
        qg = q[b].view(2, 2, 8)  # [KVH, group, D]
        probs = (qg @ k[b].transpose(1, 2) * 0.5).softmax(-1)
        torch.testing.assert_close(got[b], (probs @ v[b]).reshape(4, 8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("num_heads", "rank", "rope", "page", "lengths"),
    [(4, 32, 16, 16, [1, 17, 32]), (20, 48, 8, 32, [70, 5])],  # heads over two BLOCK_H tiles
)
def test_mla_matches_reference(
    triton_path, assert_close, dtype, num_heads, rank, rope, page, lengths
) -> None:
    gen = torch.Generator().manual_seed(rank + page)
    latents = [torch.randn(n, rank + rope, generator=gen).to(dtype) for n in lengths]
    pages, table = scattered(latents, page, 16, axis=0, seed=2)
    q = torch.randn(len(lengths), num_heads, rank + rope, generator=gen).to(dtype)
    rows = torch.arange(len(lengths), dtype=torch.int32)
    lens = torch.tensor(lengths, dtype=torch.int32)
    scale = (rank + rope) ** -0.5
    got = paged_mla(q, pages, table, rows, lens, scale, rank)
    want = paged_mla_reference(q, pages, table, rows, lens, scale, rank)
    assert_close(got, want, dtype, scale=4.0)
    latent = latents[-1].float()  # the reference against the written-out absorbed form
    probs = (q[-1].float() @ latent.T * scale).softmax(-1)
    assert_close(want[-1], probs @ latent[:, :rank], dtype, scale=4.0)


def test_launchers_check_their_inputs(triton_path) -> None:
    q = torch.randn(2, 4, 16)
    pages = torch.randn(8, 2, 2, 16, 16)
    k, v = pages[:, 0], pages[:, 1]
    table = torch.ones(2, 2, dtype=torch.int32)
    rows, lens = torch.arange(2), torch.tensor([3, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="page size 8"):
        paged_attention(q, k[:, :, :8], v[:, :, :8], table, rows, lens, 1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        paged_attention(q.half(), k, v, table, rows, lens, 1.0)
    with pytest.raises(ValueError, match="int32"):
        paged_attention(q, k, v, table.long(), rows, lens, 1.0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_attention(torch.randn(2, 3, 16), k, v, table, rows, lens, 1.0)
    latent = torch.randn(8, 16, 24)
    with pytest.raises(ValueError, match="rank"):
        paged_mla(torch.randn(2, 4, 24), latent, table, rows, lens, 1.0, 24)


def test_kernels_compile_for_hopper(sm90_compile) -> None:
    gqa_ptrs = ["q_ptr", "k_ptr", "v_ptr", "table_ptr", "rows_ptr", "lengths_ptr", "out_ptr"]
    gqa_scalars = ["scale"] + [
        f"stride_{s}" for s in ("qb", "qh", "kp", "kh", "kt", "tr", "tc", "ob", "oh")
    ]
    bf16 = dict(zip(gqa_ptrs, ["*bf16"] * 3 + ["*i32", "*i32", "*i32", "*bf16"], strict=True))
    bf16 |= {"scale": "fp32"} | {s: "i32" for s in gqa_scalars[1:]}
    gqa = dict(
        GROUP=7,
        GROUP_P=16,
        HEAD_DIM=128,
        BLOCK_D=128,
        PAGE=64,
        BLOCK_N=64,
        DOT_F32=False,
        DOT_PRECISION=None,
    )
    mla_ptrs = ["q_ptr", "latent_ptr", "table_ptr", "rows_ptr", "lengths_ptr", "out_ptr"]
    mla_sig = dict(zip(mla_ptrs, ["*bf16", "*bf16", "*i32", "*i32", "*i32", "*bf16"], strict=True))
    mla_sig |= {"scale": "fp32", "num_heads": "i32"}
    mla_sig |= {f"stride_{s}": "i32" for s in ("qb", "qh", "lp", "lt", "tr", "tc", "ob", "oh")}
    mla = dict(
        RANK=512,
        ROPE=64,
        BLOCK_R=512,
        BLOCK_P=64,
        BLOCK_H=16,
        PAGE=64,
        BLOCK_N=32,
        DOT_F32=False,
        DOT_PRECISION=None,
    )
    fp32 = {k: ("*fp32" if v == "*bf16" else v) for k, v in bf16.items()}
    kernel = dict(module="ruyiflow.kernels.paged_attention", kernel="paged_attention_kernel")
    mla_kernel = dict(module="ruyiflow.kernels.paged_mla", kernel="paged_mla_kernel")
    options = {"num_warps": 4}
    sm90_compile(
        [
            kernel | dict(signature=bf16, constexprs=gqa, options=options),
            kernel
            | dict(
                signature=fp32,
                constexprs=gqa
                | {"GROUP": 1, "HEAD_DIM": 64, "BLOCK_D": 64, "DOT_PRECISION": "ieee"},
                options=options,
            ),
            mla_kernel | dict(signature=mla_sig, constexprs=mla, options={"num_warps": 8}),
        ]
    )
