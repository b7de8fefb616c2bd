"""The embedded SmolLM2 at exit 12 through ONNX Runtime: logits, KV cache, boundary and greedy
tokens equal the torch engine's; the exported state resumes in torch; int8/int4 agree with
float32 on whatever CPU runs the test (named in its report)."""

from __future__ import annotations

import numpy as np
import torch

from ruyiflow.bench.edge import cpu_features
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.model import Work
from ruyiflow.engine.onnx.runtime import OnnxBranch
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.evaluation.prompts import HELDOUT_PROMPTS, load_prompts
from tests.onnx.util import assert_cache_equal, ort_run, torch_run

IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690, 17, 45, 99, 1000, 2000, 3000]
TOL = dict(atol=2e-4, rtol=1e-4)
NUM_TOKENS = 64
AGREE_PROMPTS, AGREE_TOKENS = 4, 48  # 192 positions: one token is 0.5 % of agreement


def test_prefill_and_decode_match_torch(smollm2, smol_dir):
    branch = OnnxBranch.open(smol_dir, threads=1, expect_fingerprint=smollm2.fingerprint)
    assert (branch.exit, branch.num_kv_layers, branch.vocab_size) == (12, 13, 49152)
    ref, cache = torch_run(smollm2, IDS, 12, split=10)
    got, boundary, present = ort_run(branch, IDS, split=10)
    np.testing.assert_allclose(got, ref, **TOL)
    assert_cache_equal(cache, present, boundary, 12)


def test_exported_state_resumes_in_torch_at_a_deeper_exit(smollm2, smol_dir):
    """Boundary + trunk KV from ONNX Runtime, moved to exit 16 by the torch model (hidden
    handoff), continue exactly like a sequence that ran in torch all along."""
    branch = OnnxBranch.open(smol_dir, threads=1)
    prompt, nxt = IDS[:-1], IDS[-1]
    _, boundary, present = ort_run(branch, prompt, len(prompt))
    model, t = smollm2.model, len(prompt)
    cache = model.new_cache()
    cache.reserve(t)
    for i in range(12):
        k, v = cache.trunk_kv(i)
        k[:, :t], v[:, :t] = torch.from_numpy(present[i][0][0]), torch.from_numpy(present[i][1][0])
    cache.boundary_buf(12)[:t] = torch.from_numpy(boundary)
    cache.length = t
    model.switch_exit(cache, 12, 16)
    resumed = model.forward([Work(cache, [nxt], t, 16)])[0]
    ref, _ = torch_run(smollm2, IDS, 16, split=len(prompt))
    np.testing.assert_allclose(resumed.numpy(), ref[-1], **TOL)


def greedy(branch, prompt: list[int], num_tokens: int, forced: list[int] | None = None):
    """Greedy tokens (or, with `forced`, the argmax after each forced token)."""
    logits, _, past = branch.run(
        np.array([prompt]),
        np.arange(len(prompt))[None],
        np.ones((1, len(prompt)), np.int64),
        branch.empty_past(1),
    )
    out = [int(logits[0].argmax())]
    for i in range(num_tokens - 1):
        pos = len(prompt) + i
        token = forced[i] if forced else out[-1]
        logits, _, past = branch.run(
            np.array([[token]]), np.array([[pos]]), np.ones((1, pos + 1), np.int64), past
        )
        out.append(int(logits[0].argmax()))
    return out


def test_greedy_tokens_equal_torch_engine(smollm2, smol_dir):
    tok = smollm2.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name a color."}]))
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2-thread torch ops crawl on a shared 2-core CI machine
    try:
        ref = [ev.token_id for ev in Engine(smollm2).generate(prompt, params, exit_layer=12)]
    finally:
        torch.set_num_threads(threads)
    branch = OnnxBranch.open(smol_dir, threads=1)
    assert greedy(branch, prompt, NUM_TOKENS) == ref


def test_int8_and_int4_agree_with_float32(smollm2, smol_dir, smol_quant_dirs, record_property):
    """Top-1 agreement with float32 along float32's greedy path (teacher forced) on the first
    held-out prompts. int8 must keep >= 90 % on CPUs without AVX-512 VNNI too, where ONNX
    Runtime's u8 x s8 int8 kernels saturate (the old dynamic int8 export kept 11 of these 192
    tokens under `qemu-x86_64 -cpu Haswell`, 155 natively with VNNI); run it under qemu to check.
    """
    features = cpu_features()
    record_property("cpu_features", features)
    tok = smollm2.tokenizer
    prompts = [
        tok.encode(tok.apply_chat_template(p.conversation()))
        for p in load_prompts(HELDOUT_PROMPTS)[:AGREE_PROMPTS]
    ]
    f32 = OnnxBranch.open(smol_dir, threads=1)
    refs = [greedy(f32, p, AGREE_TOKENS) for p in prompts]
    agree = {}
    for quant, path in smol_quant_dirs.items():
        branch = OnnxBranch.open(path, threads=1, expect_fingerprint=smollm2.fingerprint)
        assert branch.quant == quant
        got = [
            greedy(branch, p, AGREE_TOKENS, forced=r) for p, r in zip(prompts, refs, strict=True)
        ]
        same = sum(
            a == b for g, r in zip(got, refs, strict=True) for a, b in zip(g, r, strict=True)
        )
        agree[quant] = same / (AGREE_PROMPTS * AGREE_TOKENS)
    record_property("agreement_along_float32_path", agree)
    print(f"exit 12 agreement along float32's path {agree} on {features}")  # shown by -rA
    assert agree["int8"] >= 0.9, (agree, features)
    # int4 (block 32) is the size/speed option, not the faithful one: shallow exit 12's top-2
    # logits are often within its noise (58.9 % here, with AVX-512 VNNI and on AVX2 alike).
    assert agree["int4"] >= 0.5, (agree, features)
    sizes = {q: (p / "model.onnx.data").stat().st_size for q, p in smol_quant_dirs.items()}
    assert sizes["int4"] < sizes["int8"] < (smol_dir / "model.onnx.data").stat().st_size
