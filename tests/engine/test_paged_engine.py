"""Engine semantics on the paged KV cache with pages of 4 positions (so every sequence spans many
pages and decode attends block by block), on a tiny random Ruyi family (exits 1, 2, 4): equal to
the contiguous cache, batching, exit switches, handoffs, preemption, admission by free pages."""

from __future__ import annotations

import pytest
import torch

from ruyiflow.engine.attention import Segment
from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.errors import Overloaded
from ruyiflow.engine.kv_pool import CacheConfig
from ruyiflow.engine.kv_step import CpuDecodeStep, ListStep, make_step
from ruyiflow.engine.model import Work
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.engine.torch_runner import TorchRunner
from ruyiflow.kernels import cpu_attention
from tests import tiny

EXITS = [1, 2, 4]
PROMPTS = [[5, 17, 200, 3, 99, 250], [7, 8, 9], [31, 77, 2, 140, 66, 5, 12, 13, 14], [60, 61]]
PAGE_BYTES = 2 * 2 * 4 * 16 * 4  # K and V, 2 KV heads, 4 positions, head_dim 16, float32


@pytest.fixture(scope="module")
def ruyi(tmp_path_factory):
    path = tmp_path_factory.mktemp("ruyi")
    tiny.save_ruyi(path, "qwen2", EXITS, num_layers=5)
    return load_model(str(path))


def paged(loaded, num_pages: int = 4096, block_size: int = 4, **kwargs) -> Engine:
    cache = CacheConfig(block_size=block_size, kv_cache_bytes=num_pages * PAGE_BYTES)
    return Engine(TorchRunner(loaded, cache), **kwargs)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def run(engine: Engine, prompt: list[int], exit_layer: int, n: int) -> list[tuple[int, float]]:
    return [
        (e.token_id, e.confidence.max_prob) for e in engine.generate(prompt, greedy(n), exit_layer)
    ]


def steps(engine: Engine, seq_id: str, n: int) -> list[tuple[int, float]]:
    out: list[tuple[int, float]] = []
    for _ in range(n):
        out += [(e.token_id, e.confidence.max_prob) for e in engine.step() if e.seq_id == seq_id]
    return out


def same(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    torch.testing.assert_close([p for _, p in got], [p for _, p in want], atol=1e-5, rtol=1e-5)


def test_paged_forward_equals_contiguous(ruyi) -> None:
    """Prefill chunks across page edges, decode rows block by block, mixed exits in a batch."""
    model, pool = ruyi.model, TorchRunner(ruyi, CacheConfig(4, 1 << 22)).pool
    items = [(p, e) for p, e in zip(PROMPTS, [4, 1, 2, 4], strict=True)]
    contiguous = [model.new_cache() for _ in items]
    pages = [pool.new_cache() for _ in items]
    for caches in (contiguous, pages):
        chunks = [Work(c, p[:5], 0, e) for c, (p, e) in zip(caches, items, strict=True)]
        model.forward(chunks)
        rest = [Work(c, p[5:], 5, e) for c, (p, e) in zip(caches, items, strict=True) if p[5:]]
        model.forward(rest)
    for step in range(7):
        works = [
            [Work(c, [40 + step], len(p) + step, e) for c, (p, e) in zip(cs, items, strict=True)]
            for cs in (contiguous, pages)
        ]
        for a, b in zip(model.forward(works[0]), model.forward(works[1]), strict=True):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    for cache in pages:
        cache.release()
    assert pool.allocator.num_free == pool.allocator.num_blocks


def test_switch_on_pages_equals_contiguous(ruyi) -> None:
    model, pool = ruyi.model, TorchRunner(ruyi, CacheConfig(4, 1 << 22)).pool
    prompt = PROMPTS[2]
    for src, dst in [(1, 4), (4, 1), (2, 4)]:
        a, b = model.new_cache(), pool.new_cache()
        for cache in (a, b):
            model.forward([Work(cache, prompt, 0, src)])
            model.switch_exit(cache, src, dst)
        ra = model.forward([Work(a, [3], len(prompt), dst)])[0]
        rb = model.forward([Work(b, [3], len(prompt), dst)])[0]
        torch.testing.assert_close(rb, ra, atol=1e-5, rtol=1e-5)
        assert b.num_blocks() == b.layout.blocks_for(dst, len(prompt) + 1)
        b.release()


def test_batch_with_joins_and_leaves_matches_alone(ruyi) -> None:
    alone = run(paged(ruyi), PROMPTS[0], 4, 12)
    engine = paged(ruyi, max_batch=4)
    main = engine.add_request(PROMPTS[0], greedy(12), 4)
    for i, e in enumerate(EXITS):
        engine.add_request(PROMPTS[i + 1], greedy(2 + 2 * i), e)
    out, step = [], 0
    while engine.has_work():
        if step == 3:
            engine.add_request([9, 9, 8, 7, 6], greedy(5), 2)
        out += [(e.token_id, e.confidence.max_prob) for e in engine.step() if e.seq_id == main]
        step += 1
    same(out, alone)


@pytest.mark.parametrize(("src", "dst"), [(1, 4), (4, 1), (2, 4), (4, 2)])
def test_switch_exit_equals_destination(ruyi, src: int, dst: int) -> None:
    engine = paged(ruyi)
    sid = engine.add_request(PROMPTS[2], greedy(30), src)
    steps(engine, sid, 6)
    prefix = list(engine.sequences[sid].token_ids)
    engine.switch_exit(sid, dst)
    same(steps(engine, sid, 8), run(paged(ruyi), prefix, dst, 8))


@pytest.mark.parametrize(("src", "dst", "block"), [(1, 4, 8), (2, 2, 4), (4, 4, 256)])
def test_hidden_handoff_between_page_sizes(ruyi, src: int, dst: int, block: int) -> None:
    """The wire format gathers pages into the contiguous layout, so a sender with pages of 4
    positions resumes on a receiver with pages of another size."""
    engine = paged(ruyi)
    sid = engine.add_request(PROMPTS[2], greedy(30), src)
    steps(engine, sid, 7)
    prefix = list(engine.sequences[sid].token_ids)
    receiver = paged(ruyi, block_size=block)
    new_id = receiver.import_state(engine.export_state(sid, "hidden"), exit_layer=dst)
    same(steps(receiver, new_id, 8), run(paged(ruyi), prefix, dst, 8))


def test_shallower_switch_after_hidden_import_reprefills(ruyi) -> None:
    """Boundary states of exits shallower than the sender's are not in a hidden state: a later
    move there re-prefills instead of reading pages that hold nothing."""
    engine = paged(ruyi)
    sid = engine.add_request(PROMPTS[0], greedy(30), 2)
    steps(engine, sid, 4)
    receiver = paged(ruyi)
    new_id = receiver.import_state(engine.export_state(sid, "hidden"), exit_layer=4)
    steps(receiver, new_id, 2)
    prefix = list(receiver.sequences[new_id].token_ids)
    receiver.switch_exit(new_id, 1)
    assert receiver.sequences[new_id].cache.length == 0  # back to prefill
    same(steps(receiver, new_id, 6), run(paged(ruyi), prefix, 1, 6))


def test_preemption_and_recompute_give_the_same_greedy_tokens(ruyi) -> None:
    """Three sequences that each fit alone (16 positions at exit 4: 32 pages) but not together
    in 60 pages: the newest is preempted and recomputed, tokens as if each ran alone."""
    alone = [run(paged(ruyi), p, 4, 10) for p in PROMPTS[:3]]
    engine = paged(ruyi, num_pages=61)
    ids = [engine.add_request(p, greedy(10), 4) for p in PROMPTS[:3]]
    out: dict[str, list[tuple[int, float]]] = {i: [] for i in ids}
    while engine.has_work():
        for e in engine.step():
            out[e.seq_id].append((e.token_id, e.confidence.max_prob))
    assert engine.scheduler.num_preemptions > 0
    for seq_id, want in zip(ids, alone, strict=True):
        same(out[seq_id], want)


def test_admission_by_free_pages(ruyi) -> None:
    import grpc

    from ruyiflow.cluster.errors import status_code_for

    engine = paged(ruyi, num_pages=33)  # 32 pages: one sequence of 16 positions at exit 4
    with pytest.raises(Overloaded, match="KV pages") as refused:
        engine.add_request(PROMPTS[0], greedy(40), 4)  # 45 positions could never fit
    # what a node answers (the one table of error -> status code, cluster.errors)
    assert status_code_for(refused.value) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not engine.sequences and engine.scheduler.allocator.num_used == 0
    alone = [run(paged(ruyi), p, 4, 8) for p in (PROMPTS[2], PROMPTS[2][::-1])]
    first = engine.add_request(PROMPTS[2], greedy(8), 4)
    second = engine.add_request(PROMPTS[2][::-1], greedy(8), 4)
    out: dict[str, list[tuple[int, float]]] = {first: [], second: []}
    for e in engine.step():
        out[e.seq_id].append((e.token_id, e.confidence.max_prob))
    # the first prompt took 24 pages; the second prefilled what the other 8 hold (a page a slot)
    assert engine.sequences[second].cache.length == 4
    while engine.has_work():
        for e in engine.step():
            out[e.seq_id].append((e.token_id, e.confidence.max_prob))
    same(out[first], alone[0])
    same(out[second], alone[1])


def test_import_without_free_pages_is_overloaded(ruyi) -> None:
    engine = paged(ruyi)
    sid = engine.add_request(PROMPTS[2], greedy(5), 4)
    steps(engine, sid, 3)
    data = engine.export_state(sid, "hidden")  # 11 positions at exit 4: 24 pages to resume
    full = paged(ruyi, num_pages=33)
    full.add_request(PROMPTS[0], greedy(8), 4)
    full.step()  # 16 of 32 pages taken
    with pytest.raises(Overloaded, match="handoff"):
        full.import_state(data)
    assert full.scheduler.allocator.num_free == 16  # nothing kept by the refused import


def test_contiguous_path_equals_paged_and_takes_its_handoffs(ruyi) -> None:
    """`CacheConfig(paged=False)`, the simple path beside the pool, serves the same tokens, and
    a hidden state moves between the two."""
    contiguous = Engine(TorchRunner(ruyi, CacheConfig(paged=False)))
    assert contiguous.scheduler.allocator is None
    same(run(contiguous, PROMPTS[2], 2, 10), run(paged(ruyi), PROMPTS[2], 2, 10))
    engine = paged(ruyi)
    sid = engine.add_request(PROMPTS[2], greedy(30), 1)
    steps(engine, sid, 6)
    prefix = list(engine.sequences[sid].token_ids)
    new_id = contiguous.import_state(engine.export_state(sid, "hidden"), exit_layer=4)
    back = paged(ruyi).import_state(contiguous.export_state(new_id, "hidden", release=False))
    assert back.startswith("seq-")
    same(steps(contiguous, new_id, 6), run(paged(ruyi), prefix, 4, 6))


@pytest.mark.parametrize("exit_layer", [2, 4])
def test_wire_format_is_the_contiguous_caches(ruyi, exit_layer: int) -> None:
    """A hidden state exported from pages has the layout the contiguous cache (the format before
    pages) exports for the same sequence - same header, tensor names, dtypes and shapes, values
    equal to float rounding (pages of 4 attend block by block) - so old peers read it unchanged."""
    from ruyiflow.engine.handoff import decode_state
    from ruyiflow.engine.torch_runner import from_raw

    params = SamplingParams(max_tokens=30, ignore_eos=True, seed=7)
    states = []
    for engine in (paged(ruyi), Engine(TorchRunner(ruyi, CacheConfig(paged=False)))):
        sid = engine.add_request(PROMPTS[2], params, exit_layer)
        steps(engine, sid, 9)  # 17 cached positions: five pages of 4 per slot
        states.append(decode_state(engine.export_state(sid, "hidden"), engine.model_facts()))
    pages, contiguous = states
    assert pages.meta_json() == contiguous.meta_json() and pages.rng == contiguous.rng
    assert list(pages.tensors) == list(contiguous.tensors)  # boundary, trunk.{i}.{k,v}
    assert len(pages.tensors) == 1 + 2 * exit_layer
    for name, raw in pages.tensors.items():
        want = contiguous.tensors[name]
        assert (raw.dtype, raw.shape) == (want.dtype, want.shape), name
        torch.testing.assert_close(from_raw(raw), from_raw(want), atol=1e-5, rtol=1e-5)


def test_cpu_decode_steps_attend_through_the_c_kernel(ruyi, monkeypatch) -> None:
    """An all-decode step on a CPU pool takes `CpuDecodeStep` (the C paged attention, which the
    other tests here check against the contiguous cache); a step with a prefill, or the switch
    off, takes the per-item block views."""
    if not cpu_attention.is_available():
        pytest.skip("the CPU kernel library is not available here (no gcc, or switched off)")
    pool = TorchRunner(ruyi, CacheConfig(4, 1 << 22)).pool
    caches = [pool.new_cache() for _ in range(2)]
    ruyi.model.forward([Work(c, [5, 6, 7], 0, 4) for c in caches])
    decode = [Work(c, [8], 3, 4) for c in caches]
    for c in caches:
        c.reserve(4, 4)
    one_row = [Segment(i, 1, 3) for i in range(2)]
    assert type(make_step(decode, one_row)) is CpuDecodeStep
    mixed = [Segment(0, 1, 3), Segment(1, 2, 3)]
    assert type(make_step(decode, mixed)) is ListStep
    monkeypatch.setenv(cpu_attention.ENV_SWITCH, "off")
    assert type(make_step(decode, one_row)) is ListStep
    for c in caches:
        c.release()


def test_bench_alternates_the_attention_paths_and_restores_the_switch(ruyi, monkeypatch) -> None:
    """`bench engine`'s attention figure: both paths run, alternately, on the same engine."""
    if not cpu_attention.is_available():
        pytest.skip("the CPU kernel library is not available here (no gcc, or switched off)")
    from ruyiflow.bench import engine as bench_engine
    from ruyiflow.engine import model as model_module

    taken = []

    def spy(works, segments):
        step = make_step(works, segments)
        taken.append(type(step).__name__)
        return step

    monkeypatch.setattr(model_module, "make_step", spy)
    monkeypatch.setenv(cpu_attention.ENV_SWITCH, "auto")
    c_rate, items_rate = bench_engine.attention_rates(ruyi, 4, batch=3, n=6, prompt=PROMPTS[0])
    assert c_rate > 0 and items_rate > 0
    assert taken == ["ListStep", *["CpuDecodeStep", "ListStep"] * 3]  # prefill, then alternate
    assert cpu_attention.is_available()  # the switch is back to what it was
