"""The numpy sampler of the ONNX Runtime engine equals the torch sampler: same processed logits
for every processor combination, same greedy token, same confidence triple."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ruyiflow.engine import sampling as st
from ruyiflow.engine import sampling_np as sn
from ruyiflow.engine.ngrams import NgramIndex
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.kernels import exit_confidence

PARAMS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(no_repeat_ngram_size=2),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.2, top_k=5),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=0.8, top_k=7, top_p=0.5, repetition_penalty=0.9),
    SamplingParams(temperature=0.7, min_p=0.1),
    SamplingParams(temperature=1.0, top_k=20, top_p=0.9, min_p=0.05),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: str(p.to_dict()))
def test_processed_logits_equal_torch(params: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(97, generator=gen) * 3
    tokens = [3, 5, 3, 7, 3, 5]
    ngrams = NgramIndex(params.no_repeat_ngram_size) if params.no_repeat_ngram_size else None
    if ngrams:
        ngrams.add_all(tokens)
    want = st.process_row(logits, params, tokens, ngrams).numpy()
    got = sn.process_row(logits.numpy(), params, tokens, ngrams)
    assert np.array_equal(np.isinf(want), np.isinf(got))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-6)
    if params.is_greedy:
        assert sn.draw(got, params, None) == st.draw(torch.from_numpy(want), params, None)


def test_draws_follow_the_distribution_and_the_seed() -> None:
    params = SamplingParams(temperature=1.0, seed=5)
    logits = np.log(np.array([0.7, 0.2, 0.1], np.float32))
    gen, seed = sn.make_generator(params.seed)
    draws = [sn.draw(logits, params, gen) for _ in range(4000)]
    assert seed == 5
    assert np.allclose(np.bincount(draws, minlength=3) / 4000, [0.7, 0.2, 0.1], atol=0.03)
    again, _ = sn.make_generator(5)
    assert [sn.draw(logits, params, again) for _ in range(4000)] == draws


def test_confidence_equals_the_kernel_reference() -> None:
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 4
    want = [t.numpy() for t in exit_confidence(logits)]
    got = sn.exit_confidence(logits.numpy())
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("process_row", [st.process_row, sn.process_row], ids=["torch", "numpy"])
def test_min_p_keeps_tokens_near_the_top(process_row) -> None:
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04], np.float32)
    params = SamplingParams(temperature=1.0, min_p=0.15)  # keeps p >= 0.075
    logits = np.log(probs)
    row = torch.from_numpy(logits) if process_row is st.process_row else logits
    kept = np.isfinite(np.asarray(process_row(row, params, [], None)))
    assert kept.tolist() == [True, True, True, False, False]
