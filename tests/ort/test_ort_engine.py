"""The ONNX Runtime engine's scheduling and state layout, against the torch engine: batched decode
of rows with different lengths at different exits equals each request alone, a hidden-state
export resumes on the torch engine exactly like a torch export, exit switches and imports
re-prefill to the destination branch's tokens. Branches here are the torch reference with
OnnxBranch's signature (tests/ort/torch_branch.py); real exports are tested in tests/onnx."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.errors import InvalidRequest, ModelMismatch
from ruyiflow.engine.handoff import decode_state
from ruyiflow.engine.ort_engine import OrtRunner
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.engine.torch_runner import from_raw
from tests.ort.torch_branch import TorchBranch

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "2+2="]


@pytest.fixture(scope="module")
def ort(smollm2):
    branches = {e: TorchBranch(smollm2, e) for e in (12, 16)}
    return Engine(OrtRunner(branches, smollm2.tokenizer), max_batch=8)


def ids(smollm2, prompt: str) -> list[int]:
    tok = smollm2.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}]))


def run_all(engine, requests) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    seqs = [engine.add_request(p, SamplingParams(max_tokens=n), e) for p, e, n in requests]
    while engine.has_work():
        for ev in engine.step():
            out.setdefault(ev.seq_id, []).append(ev.token_id)
    return {s: out[s] for s in seqs}


def alone(smollm2, prompt_ids, exit_layer, n) -> list[int]:
    params = SamplingParams(max_tokens=n)
    return [e.token_id for e in Engine(smollm2).generate(prompt_ids, params, exit_layer)]


def test_batched_rows_equal_each_request_alone(smollm2, ort):
    shapes = zip(PROMPTS, (12, 16, 12), (9, 6, 7), strict=True)
    requests = [(ids(smollm2, p), e, n) for p, e, n in shapes]
    got = list(run_all(ort, requests).values())
    for (prompt_ids, e, n), tokens in zip(requests, got, strict=True):
        assert tokens == alone(smollm2, prompt_ids, e, n)
    assert any(b > 1 for b, s in ort.runner.branches[12].calls if s == 1)  # decode really batched


def test_hidden_export_resumes_on_torch_like_a_torch_export(smollm2, ort):
    prompt_ids = ids(smollm2, PROMPTS[0])
    torch_engine = Engine(smollm2)
    states = []
    for engine in (ort, torch_engine):
        seq = engine.add_request(prompt_ids, SamplingParams(max_tokens=12), 12)
        for _ in range(5):
            engine.step()
        states.append(engine.export_state(seq, "hidden"))
    facts = Engine(smollm2).model_facts()
    ours, ref = (decode_state(s, facts) for s in states)
    assert ours.token_ids == ref.token_ids and ours.rng is None and ref.rng is not None
    assert sorted(ours.tensors) == sorted(ref.tensors) and "boundary" in ours.tensors
    for name, tensor in ours.tensors.items():
        got, want = from_raw(tensor), from_raw(ref.tensors[name])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    continued = []
    for data in states:
        engine = Engine(smollm2)
        seq = engine.import_state(data, exit_layer=29)
        tokens = []
        while engine.has_work():
            tokens += [e.token_id for e in engine.step() if e.seq_id == seq]
        continued.append(tokens)
    assert continued[0] == continued[1] and continued[0]


def test_switch_and_import_reprefill_to_the_destination_branch(smollm2, ort):
    prompt_ids = ids(smollm2, PROMPTS[1])
    seq = ort.add_request(prompt_ids, SamplingParams(max_tokens=10), 12)
    first = [ort.step()[0].token_id for _ in range(4)]
    ort.switch_exit(seq, 16)
    rest = []
    while ort.has_work():
        rest += [e.token_id for e in ort.step()]
    assert rest == alone(smollm2, prompt_ids + first, 16, 6)
    # a tokens-mode state from the torch engine resumes here at exit 16
    torch_engine = Engine(smollm2)
    tseq = torch_engine.add_request(prompt_ids, SamplingParams(max_tokens=10), 12)
    done = [torch_engine.step()[0].token_id for _ in range(4)]
    resumed = ort.import_state(torch_engine.export_state(tseq, "tokens"), exit_layer=16)
    tail = []
    while ort.has_work():
        tail += [e.token_id for e in ort.step() if e.seq_id == resumed]
    assert done == first and tail == rest


def test_refusals(smollm2, ort):
    with pytest.raises(InvalidRequest, match="not served by this onnxruntime node"):
        ort.add_request([1, 2, 3], SamplingParams(max_tokens=2), 20)
    other = TorchBranch(smollm2, 16)
    other.fingerprint = "another"
    with pytest.raises(ModelMismatch, match="different models"):
        OrtRunner({12: ort.runner.branches[12], 16: other}, smollm2.tokenizer)
    assert np.isfinite(ort.measure_prefill(12, 16))
