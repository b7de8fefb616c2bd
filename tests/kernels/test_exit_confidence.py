"""Exit confidence: reference vs a float64 softmax oracle, Triton (interpreter) vs reference."""

from __future__ import annotations

import math

import pytest
import torch

from ruyiflow import kernels
from ruyiflow.kernels.exit_confidence import exit_confidence, exit_confidence_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NEG_INF = float("-inf")


def naive(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row by row in float64 with torch.softmax; a row with no finite logit gives zeros."""
    p1s, margins, entropies = [], [], []
    for row in logits.double():
        if not torch.isfinite(row).any():
            p1s.append(0.0), margins.append(0.0), entropies.append(0.0)
            continue
        probs = torch.softmax(row, dim=0)
        ranked = sorted(probs.tolist(), reverse=True) + [0.0]
        p1s.append(ranked[0])
        margins.append(ranked[0] - ranked[1])
        entropies.append(-sum(p * math.log(p) for p in probs.tolist() if p > 0))
    return tuple(torch.tensor(v, dtype=torch.float32) for v in (p1s, margins, entropies))


def make_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    if rows > 1:
        logits[1, : vocab // 3] = NEG_INF  # masked tokens
    if rows > 2:
        logits[2, vocab // 2] = 40.0  # a confident row: p1 ~ 1, entropy ~ 0
    if rows > 3:
        logits[3] += 80.0  # large offsets must not overflow
    if rows > 4:
        logits[4] = NEG_INF  # nothing left: defined as zeros
    return logits.to(dtype)


def check(actual, expected, atol: float) -> None:
    for name, a, e in zip(("p1", "margin", "entropy"), actual, expected, strict=True):
        assert a.dtype == torch.float32, name
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rows,vocab", [(1, 1), (2, 2), (5, 37), (6, 1000), (3, 5003)])
def test_reference_matches_naive(rows: int, vocab: int) -> None:
    logits = make_logits(rows, vocab, torch.float32, seed=vocab)
    check(exit_confidence_reference(logits), naive(logits), atol=2e-5)


def test_reference_ties_and_half_input() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, NEG_INF, NEG_INF, NEG_INF]])
    p1, margin, entropy = exit_confidence_reference(logits)
    assert margin[0] == 0.0  # two equal maxima
    assert p1[1] == 1.0 and margin[1] == 1.0 and entropy[1] == 0.0
    half = make_logits(4, 300, torch.bfloat16)
    check(exit_confidence_reference(half), naive(half.float()), atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "rows,vocab,block", [(1, 1, 16), (2, 3, 16), (5, 1000, 256), (6, 3001, 512), (5, 2048, 2048)]
)
def test_triton_matches_reference(rows: int, vocab: int, block: int, dtype: torch.dtype) -> None:
    logits = make_logits(rows, vocab, dtype, seed=rows * vocab)
    check(exit_confidence(logits, block_size=block), exit_confidence_reference(logits), atol=2e-6)


@pytest.mark.parametrize("second_offset", [16, 32, 1, 0])
def test_triton_runner_up_in_the_same_lane(second_offset: int) -> None:
    # The kernel keeps a top-2 per lane (position % BLOCK_V): a runner-up sharing the winner's
    # lane (offsets 16, 32 with BLOCK_V 16) must come from the lane's second slot; 0 is a tie.
    logits = torch.zeros(2, 64)
    logits[:, 3] = 5.0
    logits[:, 3 + second_offset] = 4.0 if second_offset else 5.0
    logits[1, 40:] = NEG_INF
    p1, margin, entropy = exit_confidence(logits, block_size=16)
    check((p1, margin, entropy), naive(logits), atol=2e-6)


def test_triton_large_vocab_and_strided_rows() -> None:
    # 256k vocabulary in 4096-wide chunks, rows taken from a wider buffer (row stride > V).
    buffer = make_logits(2, 262_144 + 100, torch.bfloat16, seed=7)
    logits = buffer[:, :262_144]
    check(exit_confidence(logits, block_size=4096), exit_confidence_reference(logits), atol=2e-6)
    check(exit_confidence(logits[:, :150_001]), naive(logits[:, :150_001]), atol=2e-5)


def test_public_function_dispatch(monkeypatch, triton_path) -> None:
    logits = make_logits(3, 500, torch.float16)
    calls = []
    monkeypatch.setattr(
        kernels, "exit_confidence_triton", lambda x: calls.append(x) or exit_confidence(x)
    )
    check(kernels.exit_confidence(logits), naive(logits), atol=2e-5)
    assert len(calls) == 1
    monkeypatch.setenv("RUYIFLOW_KERNELS", "reference")
    check(kernels.exit_confidence(logits), naive(logits), atol=2e-5)
    assert len(calls) == 1


@pytest.mark.parametrize(
    "logits,block,message",
    [
        (torch.zeros(4), None, r"\[B, V\]"),
        (torch.zeros(2, 0), None, r"V >= 1"),
        (torch.zeros(2, 8, dtype=torch.int32), None, "dtype"),
        (torch.zeros(8, 2).t(), None, "unit stride"),
        (torch.zeros(2, 8), 24, "power of two"),
        ([[0.0, 1.0]], None, "torch tensor"),
    ],
)
def test_launcher_rejects_bad_inputs(logits, block, message) -> None:
    with pytest.raises(ValueError, match=message):
        exit_confidence(logits, block_size=block)


def test_kernel_compiles_for_hopper(sm90_compile) -> None:
    jobs = [
        dict(
            module="ruyiflow.kernels.exit_confidence",
            kernel="exit_confidence_kernel",
            signature={
                "logits_ptr": f"*{dtype}",
                "p1_ptr": "*fp32",
                "margin_ptr": "*fp32",
                "entropy_ptr": "*fp32",
                "V": "i32",
                "stride_row": "i64",
            },
            constexprs={"BLOCK_V": 2048},
            options={"num_warps": 8},
        )
        for dtype in ("bf16", "fp32")
    ]
    sm90_compile(jobs)
