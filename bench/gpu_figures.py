"""Measurements of `ruyiflow bench gpu`, each against a baseline taken in the same run: decode
tokens/s (single stream, batches at a given context), transformers `generate`, the device's copy
bandwidth, hidden-state handoff cost, and the fused MoE kernel vs its torch reference.

Every function works on CPU too (the script's dry run checks itself there); on CUDA, timings end
with a device synchronisation (`engine.step` already syncs: sampling copies tokens to the host).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch

from ruyiflow.engine.engine import Engine
from ruyiflow.engine.sampling import SamplingParams

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 1690, 17, 45]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 5) -> float:
    """Bytes/s a device-to-device copy moves (read + write counted), best of `repeats`: the
    HBM figure the bound divides by."""
    src = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * src.numel() * src.element_size() / best


def token_bytes(model, exit_layer: int) -> int:
    """Weight bytes one decode token reads at an exit: everything it runs but the embedding
    table, of which it reads one row."""
    elem = model.embed.element_size()
    return (model.branch_parameters(exit_layer) - model.embed.numel()) * elem


def prompts(batch: int, length: int, vocab: int) -> list[list[int]]:
    """`batch` distinct prompts of `length` ids (deterministic, away from special ids)."""
    return [[(37 * i + 101 * b) % (vocab - 300) + 256 for i in range(length)] for b in range(batch)]


def decode_rate(
    engine: Engine, exit_layer: int, tokens: int, batch: int = 1, context: int = 0
) -> float:
    """Aggregate greedy decode tokens/s of `batch` streams whose prompts are `context` tokens
    (PROMPT when 0): all prefills run in the first step (not timed), then `tokens` decode
    steps of `batch` rows each."""
    vocab = engine.config.vocab_size
    batch_prompts = [PROMPT + [b] for b in range(batch)] if not context else None
    batch_prompts = batch_prompts or prompts(batch, context, vocab)
    params = SamplingParams(max_tokens=tokens + 1, ignore_eos=True)
    ids = [engine.add_request(p, params, exit_layer) for p in batch_prompts]
    first = engine.step()  # every prefill and first token (the step budget covers them)
    if len(first) != batch:
        raise RuntimeError(f"{len(first)} of {batch} prefills ran in one step: raise the budget")
    started, count = time.perf_counter(), 0
    while engine.has_work():
        count += len(engine.step())
    elapsed = time.perf_counter() - started
    if any(i in engine.sequences for i in ids):
        raise RuntimeError("a benchmark sequence did not finish")
    return count / elapsed


def timed_generate(model, ids: torch.Tensor, new: int) -> tuple[float, list[int]]:
    """Seconds transformers `generate` takes for exactly `new` greedy tokens after `ids` [1, T]
    (its own KV cache; synchronised on CUDA), and those tokens."""
    sync(ids.device)
    started = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    sync(ids.device)
    return time.perf_counter() - started, out[0, ids.shape[1] :].tolist()


def transformers_rate(hf, tokens: int, device: torch.device) -> float:
    """transformers `generate` (greedy, its KV cache) decode tokens/s: (time of n+1 new tokens -
    time of 1) / n, best of two."""
    ids = torch.tensor([PROMPT], device=device)

    def timed(new: int) -> float:
        return timed_generate(hf, ids, new)[0]

    with torch.inference_mode():
        timed(2)  # warm-up
        return max(tokens / (timed(tokens + 1) - timed(1)) for _ in range(2))


def handoff_cost(engine: Engine, exit_layer: int, context: int) -> dict[str, float]:
    """A sequence of `context` tokens at `exit_layer` exported in hidden mode (device ->
    bytes) and imported back (bytes -> device): bytes and milliseconds of each, best of 3."""
    prompt = prompts(1, context, engine.config.vocab_size)[0]
    export_s = import_s = float("inf")
    size = 0
    for _ in range(3):
        sid = engine.add_request(prompt, SamplingParams(max_tokens=4, ignore_eos=True), exit_layer)
        engine.step()  # prefill: the sequence is running with `context` positions cached
        started = time.perf_counter()
        data = engine.export_state(sid, "hidden")
        export_s = min(export_s, time.perf_counter() - started)
        started = time.perf_counter()
        new_id = engine.import_state(data, exit_layer=exit_layer)
        sync(engine.runner.device)
        import_s = min(import_s, time.perf_counter() - started)
        engine.abort(new_id)
        size = len(data)
    return {"bytes": size, "export_ms": export_s * 1e3, "import_ms": import_s * 1e3}


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 20) -> float:
    """Median ms of `fn()` (CUDA: triton's do_bench, caches flushed between runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def fused_moe_rows(
    num_experts: int, top_k: int, hidden: int, inter: int, token_counts: list[int], device
) -> list[dict[str, float]]:
    """The fused MoE Triton kernel vs `fused_moe_reference` (one matmul pair per active
    expert) at each token count: times, speed-up, largest difference. On CPU the dispatching
    `kernels.fused_moe` stands in for the Triton side."""
    from ruyiflow import kernels

    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, device=device, generator=gen)
    w_gate_up = (w_gate_up * hidden**-0.5).to(dtype)
    w_down = (
        torch.randn(num_experts, hidden, inter, device=device, generator=gen) * inter**-0.5
    ).to(dtype)
    # the kernel alone: no range check of the ids (a device sync), as in a served step
    cuda = device.type == "cuda"
    fast = partial(kernels.fused_moe_triton, validate_ids=False) if cuda else kernels.fused_moe
    rows = []
    for num in token_counts:
        x = torch.randn(num, hidden, device=device, generator=gen).to(dtype)
        logits = torch.randn(num, num_experts, device=device, generator=gen)
        weights, ids = kernels.route_experts(logits, top_k)
        args = (x, w_gate_up, w_down, weights, ids)
        diff = (fast(*args).float() - kernels.fused_moe_reference(*args).float()).abs().max()
        ref_ms = time_ms(lambda a=args: kernels.fused_moe_reference(*a), device)
        fast_ms = time_ms(lambda a=args: fast(*a), device)
        rows.append(
            {
                "tokens": num,
                "reference_ms": ref_ms,
                "triton_ms": fast_ms,
                "speedup": ref_ms / fast_ms,
                "max_diff": diff.item(),
            }
        )
    return rows
