"""The device path of the served forward (what runs on CUDA: the device block table, stores by
index, Triton paged-attention kernels for decode, Triton RMSNorm, SDPA prefill over gathered
pages), run on the CPU through Triton's interpreter and compared with the torch path on the same
paged pool: prefill chunks, mixed prefill + decode steps, decode-only steps, exits, switches,
handoffs; MoE with MLA (DeepSeek-V3) and with QK-norm after RoPE (Hunyuan)."""

from __future__ import annotations

import os

import pytest
import torch

from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.kv_pool import CacheConfig
from ruyiflow.engine.model import Work
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.engine.torch_runner import TorchRunner
from tests import tiny

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel launch imports triton
pytest.importorskip("triton")
TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture(scope="module")
def ruyi(tmp_path_factory):
    path = tmp_path_factory.mktemp("ruyi")
    tiny.save_ruyi(path, "qwen3", [1, 2, 4], num_layers=5)  # head_dim 24: padded in the kernel
    return load_model(str(path))


def on(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setenv("RUYIFLOW_KERNELS", "triton" if path == "device" else "reference")


def count_launches(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the device path's kernel launches (so a test knows that path ran)."""
    from ruyiflow.engine import device_kv

    counts = {"paged_attention": 0, "paged_mla": 0}
    for name in counts:
        kernel = getattr(device_kv, name)

        def counted(*args, kernel=kernel, name=name):
            counts[name] += 1
            return kernel(*args)

        monkeypatch.setattr(device_kv, name, counted)
    return counts


def forward_both(monkeypatch, model, pool, steps) -> dict[str, int]:
    """Run each step's works (built per cache) on the device and the torch path; compare.
    Returns the device path's kernel launches."""
    launches = count_launches(monkeypatch)
    caches = {path: [pool.new_cache() for _ in range(4)] for path in ("device", "torch")}
    for make in steps:
        out = {}
        for path, cs in caches.items():
            on(monkeypatch, path)
            out[path] = model.forward(make(cs))
        for got, want in zip(out["device"], out["torch"], strict=True):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, **TOL)
    for cs in caches.values():
        for c in cs:
            c.release()
    return launches


def test_familial_forward_device_equals_torch(monkeypatch, ruyi) -> None:
    pool = TorchRunner(ruyi, CacheConfig(16, 1 << 22)).pool
    prompts = [list(range(3, 40)), [7, 8, 9], list(range(50, 70)), [60, 61]]
    exits = [4, 1, 2, 4]
    steps = [
        # first chunks (start 0: SDPA over the chunk itself)
        lambda cs: [Work(cs[k], prompts[k][:18], 0, exits[k]) for k in (0, 2)],
        # a later chunk (SDPA over gathered pages) beside a new prefill
        lambda cs: [Work(cs[0], prompts[0][18:], 18, 4), Work(cs[1], prompts[1], 0, 1)],
        # mixed: decode rows beside prefill chunks
        lambda cs: [
            Work(cs[0], [5], 37, 4),
            Work(cs[2], prompts[2][18:], 18, 2),
            Work(cs[3], prompts[3], 0, 4),
        ],
    ]
    lengths = [38, 3, 20, 2]
    for t in range(15):  # decode only: one kernel launch per layer; every row crosses a page edge
        steps.append(
            lambda cs, t=t: [Work(cs[k], [11 + k], lengths[k] + t, exits[k]) for k in range(4)]
        )
    launches = forward_both(monkeypatch, ruyi.model, pool, steps)
    # decode-only steps: one launch per layer run (4 trunk + 3 branch layers)
    assert all((n - 1) // 16 < (n + 14) // 16 for n in lengths)  # the page edges crossed
    assert launches["paged_attention"] >= 15 * 7


def test_switch_and_handoff_device_equals_torch(monkeypatch, ruyi) -> None:
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    results = {}
    for path in ("device", "torch"):
        on(monkeypatch, path)
        engine = Engine(TorchRunner(ruyi, CacheConfig(16, 1 << 22)))
        sid = engine.add_request(list(range(3, 23)), params, 2)
        tokens = [e.token_id for _ in range(4) for e in engine.step()]
        engine.switch_exit(sid, 4)  # deeper: trunk layers over boundary pages
        tokens += [e.token_id for _ in range(4) for e in engine.step()]
        engine.switch_exit(sid, 1)  # shallower: the branch layer only
        tokens += [e.token_id for _ in range(4) for e in engine.step()]
        receiver = Engine(TorchRunner(ruyi, CacheConfig(16, 1 << 22)))
        new_id = receiver.import_state(engine.export_state(sid, "hidden"), exit_layer=4)
        tokens += [e.token_id for _ in range(6) for e in receiver.step() if e.seq_id == new_id]
        results[path] = tokens
    assert results["device"] == results["torch"] and len(results["torch"]) == 18


@pytest.mark.parametrize("variant", ["deepseek_v3", "hunyuan_v1_moe"])
def test_moe_forward_device_equals_torch(monkeypatch, tiny_moe, variant) -> None:
    _, _, loaded = tiny_moe(variant)
    pool = TorchRunner(loaded, CacheConfig(16, 1 << 22)).pool
    last = loaded.config.last_exit
    prompts = [list(range(5, 30)), [9, 8, 7]]
    steps = [
        lambda cs: [Work(cs[0], prompts[0][:17], 0, last)],
        lambda cs: [Work(cs[0], prompts[0][17:], 17, last), Work(cs[1], prompts[1], 0, last)],
    ]
    for t in range(10):
        steps.append(
            lambda cs, t=t: [Work(cs[0], [3], 25 + t, last), Work(cs[1], [4], 3 + t, last)]
        )
    launches = forward_both(monkeypatch, loaded.model, pool, steps)
    kernel = "paged_mla" if loaded.config.mla is not None else "paged_attention"
    assert launches[kernel] == 10 * loaded.config.num_layers


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    from tests.moe.tiny_moe import save_moe

    built = {}

    def get(variant: str):
        if variant not in built:
            path = tmp_path_factory.mktemp(variant)
            built[variant] = (path, save_moe(path, variant), load_model(str(path)))
        return built[variant]

    return get


class ReplayedBody:
    """Stands in for a captured CUDA graph on the CPU: `replay` runs the captured body again
    over the static inputs into the same output tensor, as a graph replay does."""

    def __init__(self, graphs, exit_layer: int, bucket: int):
        self.graphs, self.exit, self.bucket = graphs, exit_layer, bucket
        self.out = graphs._body(exit_layer, bucket)

    @torch.inference_mode()
    def replay(self) -> None:
        self.out.copy_(self.graphs._body(self.exit, self.bucket))


def test_graph_body_over_static_inputs_equals_eager(monkeypatch, ruyi) -> None:
    """What `ruyiflow.engine.cuda_graphs` captures (the padded static-input decode step, the
    scratch row for padding) gives eager's tokens; the capture itself needs a GPU (`-m gpu`)."""
    from ruyiflow.engine.cuda_graphs import DecodeGraphs, GraphConfig

    class CPUGraphs(DecodeGraphs):
        def _graph(self, exit_layer: int, bucket: int):
            key = (exit_layer, bucket)
            if key not in self.graphs:
                self._scratch_inputs(bucket)
                body = ReplayedBody(self, exit_layer, bucket)
                self.graphs[key] = (body, body.out)
            return self.graphs[key]

    on(monkeypatch, "device")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = [list(range(3, 23)), [5, 6, 7], list(range(40, 47))]
    results = {}
    for mode in ("graphs", "eager"):
        runner = TorchRunner(ruyi, CacheConfig(16, 1 << 22))
        if mode == "graphs":
            config = GraphConfig(enabled=True, buckets=(1, 2, 4), max_context=64)
            runner.graphs = CPUGraphs(runner.model, runner.pool, config)
        engine = Engine(runner)
        ids = [engine.add_request(p, params, 4) for p in prompts]  # 3 rows: padded to 4
        out = {i: [] for i in ids}
        while engine.has_work():
            for e in engine.step():
                out[e.seq_id].append((e.token_id, round(e.confidence.max_prob, 5)))
        results[mode] = [out[i] for i in ids]
        if mode == "graphs":
            assert runner.graphs.num_replays >= 6 and (4, 4) in runner.graphs.graphs
    assert results["graphs"] == results["eager"]
