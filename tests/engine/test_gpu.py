"""The engine on a CUDA device (marked `gpu`: skipped without one; `ruyiflow bench gpu` runs
them first): weights loaded onto the device, greedy parity with transformers on CUDA through the
served path (paged pool, Triton paged attention, RMSNorm and exit confidence), MoE with MLA, and
CUDA-graph decode == eager decode token for token (the check that must pass before
`GraphConfig.enabled` may be turned on anywhere)."""

from __future__ import annotations

import pytest
import torch

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.cuda_graphs import GraphConfig
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.kv_pool import CacheConfig
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.engine.torch_runner import TorchRunner
from tests import tiny

pytestmark = pytest.mark.gpu

PROMPTS = [[5, 17, 200, 3, 99, 250], [7, 8, 9], [31, 77, 2, 140, 66, 5, 12, 13, 14], [60, 61]]
CACHE = CacheConfig(block_size=16, kv_cache_bytes=64 << 20)  # pages of 16: many per sequence


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation through transformers' own KV cache (an eos token is just another
    token, as with our `ignore_eos`)."""
    out, past = [], None
    tokens = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        for _ in range(n):
            step = model(tokens, past_key_values=past, use_cache=True)
            past = step.past_key_values
            out.append(int(step.logits[0, -1].argmax()))
            tokens = torch.tensor([[out[-1]]], device=model.device)
    return out


def tokens(engine: Engine, prompt: list[int], exit_layer: int, n: int) -> list[int]:
    return [e.token_id for e in engine.generate(prompt, greedy(n), exit_layer)]


def batched(engine: Engine, prompts: list[list[int]], exit_layer: int, n: int) -> list[list[int]]:
    ids = [engine.add_request(p, greedy(n), exit_layer) for p in prompts]
    out: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for e in engine.step():
            out[e.seq_id].append(e.token_id)
    return [out[i] for i in ids]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_greedy_parity_with_transformers_on_cuda(tmp_path, family) -> None:
    ref = tiny.save_plain(tmp_path, family).to("cuda")
    loaded = load_model(str(tmp_path), device="cuda")
    assert loaded.model.embed.device.type == "cuda"
    engine = Engine(TorchRunner(loaded, CACHE), max_batch=4)
    assert engine.runner.pool.pages.device.type == "cuda"
    last = loaded.config.last_exit
    for prompt in PROMPTS:
        assert tokens(engine, prompt, last, 40) == hf_greedy(ref, prompt, 40)
    want = [hf_greedy(ref, p, 24) for p in PROMPTS]
    assert batched(engine, PROMPTS, last, 24) == want


def test_moe_with_mla_greedy_parity_on_cuda(tmp_path) -> None:
    from tests.moe.tiny_moe import save_moe

    ref = save_moe(tmp_path, "deepseek_v3").to("cuda")
    loaded = load_model(str(tmp_path), device="cuda")
    engine = Engine(TorchRunner(loaded, CACHE), max_batch=4)
    last = loaded.config.last_exit
    want = [hf_greedy(ref, p, 20) for p in PROMPTS]
    assert batched(engine, PROMPTS, last, 20) == want


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_equals_eager(tmp_path, dtype) -> None:
    """Batches of 1..4 rows (buckets 1, 2, 4 with padding rows), sequences crossing page edges,
    rows joining and leaving: graph replays give the eager path's tokens."""
    tiny.save_ruyi(tmp_path, "qwen2", [1, 2, 4], num_layers=5)
    loaded = load_model(str(tmp_path), dtype, device="cuda")
    eager = Engine(TorchRunner(loaded, CACHE), max_batch=4)
    graphed_runner = TorchRunner(loaded, CACHE, GraphConfig(enabled=True, max_context=512))
    graphed = Engine(graphed_runner, max_batch=4)
    for exit_layer in (1, 4):
        for prompts in (PROMPTS[:1], PROMPTS[:3], PROMPTS):
            want = batched(eager, prompts, exit_layer, 40)
            assert batched(graphed, prompts, exit_layer, 40) == want
    assert graphed_runner.graphs.num_replays > 0
    assert {b for _, b in graphed_runner.graphs.graphs} >= {1, 4}


def test_moe_cuda_graph_decode_equals_eager(tmp_path) -> None:
    from tests.moe.tiny_moe import save_moe

    save_moe(tmp_path, "deepseek_v3")
    loaded = load_model(str(tmp_path), device="cuda")
    last = loaded.config.last_exit
    want = batched(Engine(TorchRunner(loaded, CACHE), max_batch=4), PROMPTS, last, 30)
    runner = TorchRunner(loaded, CACHE, GraphConfig(enabled=True, max_context=512))
    assert batched(Engine(runner, max_batch=4), PROMPTS, last, 30) == want
    assert runner.graphs.num_replays > 0


def test_a_device_index_out_of_range_is_one_error(tmp_path) -> None:
    from ruyiflow.engine.errors import ModelLoadError

    tiny.save_plain(tmp_path, "qwen2")
    with pytest.raises(ModelLoadError, match="CUDA device"):
        load_model(str(tmp_path), device=f"cuda:{torch.cuda.device_count()}")
