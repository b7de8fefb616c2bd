"""CPU paged decode attention (`kernels.cpu_attention`): every path of the C library against the
paged reference (SDPA in float32 over gathered pages), the K/V store, bitwise determinism per
row, the switches, and refusal of indices outside the tensors (nothing written).

Runs once per path of the CPU library (`avx512`, `avx2`, `plain`); a path this CPU lacks is
skipped with the reason, and everything skips where gcc is missing.
"""

from __future__ import annotations

import pytest
import torch

from ruyiflow.kernels import cpu_attention, cpu_gemv
from ruyiflow.kernels.cpu_attention import cpu_paged_attention
from ruyiflow.kernels.paged_attention import paged_attention_reference

# (query heads, KV heads, head dim, page): SmolLM2's 9/3/64, MHA, a wide group, a head dim with
# a tail after the 16 lanes, one long page (the CPU pool's 256).
GEOMETRIES = [(9, 3, 64, 16), (4, 4, 32, 16), (16, 2, 128, 32), (6, 2, 40, 16), (8, 2, 64, 256)]
# one position, a full page, one past it, several pages
LENGTHS = [1, 16, 17, 50, 97]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def problem(
    geometry: tuple[int, int, int, int], dtype: torch.dtype, lengths: list[int], seed: int = 0
) -> dict:
    """Pages as the pool lays them out ([NP, 2, KVH, PAGE, D]: K then V per page), a table whose
    rows hold distinct pages in shuffled order, and q/k_new/v_new as strided views of one qkv
    projection, as `gqa_attention` hands them over."""
    heads, num_kv, dim, page = geometry
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // page) for n in lengths) + 1
    num_rows = len(lengths) + 2
    num_pages = num_rows * width + 1  # page 0 never handed out, as in the pool
    pages = torch.randn(num_pages, 2, num_kv, page, dim, generator=g).to(dtype)
    table = (torch.randperm(num_pages - 1, generator=g) + 1).to(torch.int32)
    table = table[: num_rows * width].view(num_rows, width)
    rows = torch.randperm(num_rows, generator=g)[: len(lengths)].to(torch.int32)
    qkv = torch.randn(len(lengths), heads + 2 * num_kv, dim, generator=g).to(dtype)
    return {
        "pages": pages,
        "table": table,
        "rows": rows,
        "lengths": torch.tensor(lengths, dtype=torch.int32),
        "q": qkv[:, :heads],
        "k_new": qkv[:, heads : heads + num_kv],
        "v_new": qkv[:, heads + num_kv :],
        "scale": dim**-0.5,
    }


def run(p: dict, store: bool = True, pages: torch.Tensor | None = None) -> torch.Tensor:
    pages = p["pages"] if pages is None else pages
    new = (p["k_new"], p["v_new"]) if store else (None, None)
    return cpu_paged_attention(
        p["q"], pages[:, 0], pages[:, 1], p["table"], p["rows"], p["lengths"], p["scale"], *new
    )


def reference(p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Store each new row where its last position falls, then the paged reference."""
    pages = p["pages"].clone()
    page_size = pages.shape[3]
    for b, (row, n) in enumerate(zip(p["rows"].tolist(), p["lengths"].tolist(), strict=True)):
        page = p["table"][row, (n - 1) // page_size]
        pages[page, 0, :, (n - 1) % page_size] = p["k_new"][b]
        pages[page, 1, :, (n - 1) % page_size] = p["v_new"][b]
    out = paged_attention_reference(
        p["q"], pages[:, 0], pages[:, 1], p["table"], p["rows"], p["lengths"], p["scale"]
    )
    return out, pages


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_matches_the_paged_reference_and_stores_the_new_rows(path, geometry, dtype) -> None:
    p = problem(geometry, dtype, LENGTHS)
    expected, expected_pages = reference(p)
    out = run(p)
    assert torch.equal(p["pages"], expected_pages)  # stored where the reference stores
    torch.testing.assert_close(out.float(), expected.float(), atol=TOLERANCE[dtype], rtol=0)
    assert out.dtype == dtype and out.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_alone_equals_row_in_batch_bitwise(path, dtype) -> None:
    p = problem(GEOMETRIES[0], dtype, LENGTHS, seed=1)
    batch = run(p, store=False)
    for b in range(len(LENGTHS)):
        alone = cpu_paged_attention(
            p["q"][b : b + 1].clone(),
            p["pages"][:, 0],
            p["pages"][:, 1],
            p["table"],
            p["rows"][b : b + 1].clone(),
            p["lengths"][b : b + 1].clone(),
            p["scale"],
        )
        assert torch.equal(alone, batch[b : b + 1])


def test_threads_do_not_change_the_result(path, monkeypatch) -> None:
    p = problem(GEOMETRIES[2], torch.float32, LENGTHS, seed=2)
    one = run(p, store=False)
    monkeypatch.setattr(cpu_gemv, "_threads", 2)
    assert torch.equal(run(p, store=False), one)


def test_avx2_and_avx512_agree_bitwise(cache, monkeypatch) -> None:
    have = cpu_gemv.supported_paths()
    if "avx512" not in have:
        pytest.skip(f"this CPU runs {', '.join(have)}: no AVX-512 to compare AVX2 with")
    p = problem(GEOMETRIES[0], torch.float32, LENGTHS, seed=3)
    results = []
    for name in ("avx512", "avx2"):
        monkeypatch.setenv(cpu_gemv.ENV_SWITCH, name)
        cpu_gemv.reset()
        results.append(run(p, store=False))
    cpu_gemv.reset()
    assert torch.equal(*results)


@pytest.mark.parametrize(
    "corrupt",
    ["page_id", "negative_page", "row", "length_zero", "length_past_table"],
)
def test_indices_outside_the_tensors_raise_and_write_nothing(path, corrupt) -> None:
    p = problem(GEOMETRIES[0], torch.float32, LENGTHS, seed=4)
    last = len(LENGTHS) - 1
    row = p["rows"][last].item()
    if corrupt == "page_id":
        p["table"][row, 0] = p["pages"].shape[0]
    elif corrupt == "negative_page":
        p["table"][row, 1] = -1
    elif corrupt == "row":
        p["rows"][last] = p["table"].shape[0]
    elif corrupt == "length_zero":
        p["lengths"][last] = 0
    else:
        p["lengths"][last] = p["table"].shape[1] * p["pages"].shape[3] + 1
    before = p["pages"].clone()
    with pytest.raises(ValueError, match="outside the table or the pages"):
        run(p)
    assert torch.equal(p["pages"], before)


def test_bad_shapes_and_dtypes_are_value_errors(path) -> None:
    p = problem(GEOMETRIES[0], torch.float32, [5, 9])
    k, v = p["pages"][:, 0], p["pages"][:, 1]
    args = (p["table"], p["rows"], p["lengths"], p["scale"])
    with pytest.raises(ValueError, match="share one dtype"):
        cpu_paged_attention(p["q"].double(), k, v, *args)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        cpu_paged_attention(p["q"][:, :8], k, v, *args)
    with pytest.raises(ValueError, match="int32"):
        cpu_paged_attention(p["q"], k, v, p["table"].long(), *args[1:])
    with pytest.raises(ValueError, match="both k_new and v_new"):
        cpu_paged_attention(p["q"], k, v, *args, p["k_new"])


def test_switches(cache, monkeypatch) -> None:
    cpu_gemv.reset()
    monkeypatch.delenv(cpu_gemv.ENV_SWITCH, raising=False)
    monkeypatch.delenv(cpu_attention.ENV_SWITCH, raising=False)
    assert cpu_attention.is_available()
    monkeypatch.setenv(cpu_attention.ENV_SWITCH, "off")
    assert not cpu_attention.is_available()
    monkeypatch.setenv(cpu_attention.ENV_SWITCH, "sometimes")
    with pytest.raises(ValueError, match="RUYIFLOW_CPU_ATTENTION"):
        cpu_attention.is_available()
    monkeypatch.delenv(cpu_attention.ENV_SWITCH)
    monkeypatch.setenv(cpu_gemv.ENV_SWITCH, "off")
    cpu_gemv.reset()
    assert not cpu_attention.is_available()  # the library is off: the engine attends per item
    p = problem(GEOMETRIES[0], torch.float32, [3])
    with pytest.raises(RuntimeError, match="not loaded"):
        run(p)
    cpu_gemv.reset()


@pytest.mark.parametrize("spread", [30.0, 1000.0])
def test_peaked_softmax_matches_the_reference(path, spread) -> None:
    """Scores hundreds apart: the kernel's exp flushes below e^-87 to zero, as float32 exp does
    in effect (the terms vanish beside the largest)."""
    p = problem(GEOMETRIES[0], torch.float32, LENGTHS, seed=5)
    p["q"] = p["q"] * spread
    expected, _ = reference(p)
    torch.testing.assert_close(run(p), expected, atol=1e-5, rtol=1e-5)
