"""MoE routing and fused experts: references vs naive loops, Triton (interpreter) vs references."""

from __future__ import annotations

import math

import pytest
import torch

from ruyiflow import kernels
from ruyiflow.kernels.fused_moe import fused_moe, fused_moe_reference, moe_align_block_size
from ruyiflow.kernels.moe_routing import route_experts, route_experts_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (top_k, kwargs) for the families we serve, at small sizes.
ROUTINGS = {
    "hunyuan": (8, dict(scoring="softmax")),
    "softmax_no_renorm": (3, dict(scoring="softmax", renormalize=False)),
    "dots1": (6, dict(scoring="sigmoid", bias=True, routed_scaling_factor=2.5)),
    "deepseek_v3": (
        8,
        dict(scoring="sigmoid", bias=True, routed_scaling_factor=2.5, num_groups=8, topk_groups=4),
    ),
    "groups_of_six": (4, dict(scoring="sigmoid", bias=True, num_groups=4, topk_groups=2)),
}
NUM_EXPERTS = {
    "hunyuan": 64,
    "softmax_no_renorm": 10,
    "dots1": 128,
    "deepseek_v3": 64,
    "groups_of_six": 24,
}


def routing_inputs(name: str, num_tokens: int, seed: int = 0):
    top_k, kwargs = ROUTINGS[name]
    kwargs = dict(kwargs)
    gen = torch.Generator().manual_seed(seed)
    num_experts = NUM_EXPERTS[name]
    logits = torch.randn(num_tokens, num_experts, generator=gen) * 2
    if kwargs.pop("bias", False):
        kwargs["correction_bias"] = torch.randn(num_experts, generator=gen) * 0.5
    return logits, top_k, kwargs


def naive_route(
    logits,
    top_k,
    scoring="softmax",
    correction_bias=None,
    renormalize=True,
    routed_scaling_factor=1.0,
    num_groups=1,
    topk_groups=1,
):
    """Token by token in float64 with Python sorting."""
    num_experts = logits.shape[1]
    bias = correction_bias.tolist() if correction_bias is not None else [0.0] * num_experts
    size = num_experts // num_groups
    all_w, all_ids = [], []
    for row in logits.double().tolist():
        if scoring == "softmax":
            exps = [math.exp(v - max(row)) for v in row]
            scores = [e / sum(exps) for e in exps]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        select = [s + b for s, b in zip(scores, bias, strict=True)]
        group_score = [
            sum(sorted(select[g * size : (g + 1) * size])[-2:]) for g in range(num_groups)
        ]
        kept = sorted(range(num_groups), key=lambda g: -group_score[g])[:topk_groups]
        allowed = [e for g in kept for e in range(g * size, (g + 1) * size)]
        ids = sorted(allowed, key=lambda e: -select[e])[:top_k]
        weights = [scores[e] for e in ids]
        if renormalize:
            weights = [w / max(sum(weights), 1e-20) for w in weights]
        all_w.append([w * routed_scaling_factor for w in weights])
        all_ids.append(ids)
    return torch.tensor(all_w, dtype=torch.float32), torch.tensor(all_ids)


def by_expert(weights: torch.Tensor, ids: torch.Tensor):
    """Rows re-ordered by expert id, so that selections compare as sets."""
    ids_sorted, order = ids.sort(dim=1)
    return weights.gather(1, order), ids_sorted


def assert_same_routing(actual, expected) -> None:
    (w, ids), (w_ref, ids_ref) = by_expert(*actual), by_expert(*expected)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == torch.int64
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", list(ROUTINGS))
def test_route_reference_matches_naive(name: str) -> None:
    logits, top_k, kwargs = routing_inputs(name, 17)
    assert_same_routing(
        route_experts_reference(logits, top_k, **kwargs), naive_route(logits, top_k, **kwargs)
    )


@pytest.mark.parametrize("name", list(ROUTINGS))
@pytest.mark.parametrize("num_tokens", [1, 33])
def test_route_triton_matches_reference(name: str, num_tokens: int) -> None:
    logits, top_k, kwargs = routing_inputs(name, num_tokens, seed=num_tokens)
    assert_same_routing(
        route_experts(logits, top_k, **kwargs), route_experts_reference(logits, top_k, **kwargs)
    )


@pytest.mark.parametrize("impl", [route_experts_reference, route_experts])
def test_correction_bias_changes_selection_not_weights(impl) -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    w_plain, ids_plain = impl(logits, 2, scoring="sigmoid", routed_scaling_factor=2.5)
    w_bias, ids_bias = impl(
        logits, 2, scoring="sigmoid", correction_bias=bias, routed_scaling_factor=2.5
    )
    assert set(ids_plain[0].tolist()) == {0, 1}
    assert set(ids_bias[0].tolist()) == {0, 7}  # expert 7 chosen only thanks to the bias
    scores = torch.sigmoid(logits[0, [0, 7]])
    expected = scores / scores.sum() * 2.5  # weights come from the unbiased scores
    torch.testing.assert_close(by_expert(w_bias, ids_bias)[0][0], expected)


@pytest.mark.parametrize("impl", [route_experts_reference, route_experts])
def test_group_limit_excludes_other_groups(impl) -> None:
    # Expert 0 alone is the best, but group 1 (experts 4-7) has the better top-2 sum.
    logits = torch.tensor([[9.0, -9.0, -9.0, -9.0, 2.0, 2.0, 1.0, 1.0]])
    _, ids = impl(logits, 2, scoring="sigmoid", num_groups=2, topk_groups=1)
    assert set(ids[0].tolist()) == {4, 5}
    _, ids = impl(logits, 2, scoring="sigmoid")
    assert 0 in ids[0].tolist()


def test_route_public_dispatch(monkeypatch, triton_path) -> None:
    logits, top_k, kwargs = routing_inputs("dots1", 5)
    calls = []
    monkeypatch.setattr(
        kernels, "route_experts_triton", lambda *a, **k: calls.append(a) or route_experts(*a, **k)
    )
    assert_same_routing(
        kernels.route_experts(logits, top_k, **kwargs), naive_route(logits, top_k, **kwargs)
    )
    assert len(calls) == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(scoring="relu"), "scoring"),
        (dict(num_groups=3), "groups"),
        (dict(num_groups=4, topk_groups=5), "topk_groups"),
        (dict(top_k=9), "top_k"),
        (dict(num_groups=4, topk_groups=1, top_k=3), "top_k"),
        (dict(correction_bias=torch.zeros(4)), "correction_bias"),
        (dict(correction_bias=torch.zeros(8, dtype=torch.float64)), "correction_bias"),
    ],
)
@pytest.mark.parametrize("impl", [route_experts_reference, route_experts])
def test_route_rejects_bad_arguments(impl, kwargs, message) -> None:
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=message):
        impl(torch.randn(3, 8), kwargs.pop("top_k", 2), **kwargs)


def test_route_rejects_half_logits() -> None:
    with pytest.raises(ValueError, match="float32"):
        route_experts(torch.randn(3, 8).half(), 2)


# --------------------------------------------------------------------------- fused experts


def moe_inputs(num_tokens, num_experts, top_k, hidden, inter, dtype, seed=0, unused_expert=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    w_gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w_down = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    # Distinct experts per token, with the last expert never chosen when asked.
    choices = num_experts - 1 if unused_expert else num_experts
    ids = torch.rand(num_tokens, choices, generator=gen).argsort(dim=1)[:, :top_k]
    weights = torch.rand(num_tokens, top_k, generator=gen)
    return x, w_gate_up.to(dtype), w_down.to(dtype), weights, ids


def naive_moe(x, w_gate_up, w_down, weights, ids):
    """Dense: every expert on every token in float64, masked by the routing."""
    x, w_gate_up, w_down = x.double(), w_gate_up.double(), w_down.double()
    inter = w_down.shape[2]
    out = torch.zeros_like(x)
    for e in range(w_gate_up.shape[0]):
        gate, up = (x @ w_gate_up[e].T).split(inter, dim=1)
        expert_out = (torch.nn.functional.silu(gate) * up) @ w_down[e].T  # [T, H]
        coef = (weights.double() * (ids == e)).sum(1, keepdim=True)  # [T, 1]
        out += coef * expert_out
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_moe_reference_matches_dense_loop(dtype, assert_close) -> None:
    args = moe_inputs(23, 6, 3, 72, 40, dtype)
    out = fused_moe_reference(*args)
    assert out.dtype == dtype and out.shape == (23, 72)
    assert_close(out, naive_moe(*args), dtype, scale=4.0)


def test_moe_align_block_size_layout() -> None:
    ids = torch.tensor([[2, 0], [2, 3], [0, 2], [2, 2], [3, 0]])  # expert 1 gets nothing
    sorted_slots, block_experts, num_padded = moe_align_block_size(ids, 4, 5)
    flat = ids.flatten()
    used = int(num_padded)
    assert used == 4 + 8 + 4  # experts 0, 2, 3 hold 3, 5 and 2 slots: 1, 2 and 1 blocks
    assert block_experts[:4].tolist() == [0, 2, 2, 3]
    segments = sorted_slots[:used].view(-1, 4)
    for block, expert in zip(segments, block_experts[: used // 4], strict=True):
        real = block[block < flat.numel()]
        assert (flat[real.long()] == expert).all()  # one expert per block
    real = sorted_slots[sorted_slots < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # every slot exactly once
    assert (sorted_slots[used:] == flat.numel()).all()
    assert (block_experts[used // 4 :] == 5).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens,num_experts,top_k,blocks",
    [
        (1, 6, 2, (16, 32, 32)),  # decode: one token
        (13, 6, 3, (16, 32, 32)),  # an expert with no tokens; partial N and K tiles
        (40, 8, 2, (16, 16, 64)),  # many tokens, many row tiles
        (9, 6, 2, None),  # the launcher's own (decode) configuration
        (64, 4, 2, None),  # the launcher's prefill configuration
    ],
)
def test_moe_triton_matches_reference(
    num_tokens, num_experts, top_k, blocks, dtype, assert_close
) -> None:
    args = moe_inputs(num_tokens, num_experts, top_k, 72, 40, dtype, seed=num_tokens)
    block_m, block_n, block_k = blocks or (None, None, None)
    out = fused_moe(*args, block_m=block_m, block_n=block_n, block_k=block_k)
    assert out.dtype == dtype and out.shape == args[0].shape
    # The kernel keeps gate/up in float32 where the reference rounds them to dtype (as HF does).
    assert_close(out, fused_moe_reference(*args), dtype, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_moe_triton_one_slot_per_tile(num_tokens, dtype, assert_close) -> None:
    # The decode path: no alignment, one tile per slot; with 3 tokens experts repeat across
    # tokens and are read once per slot.
    args = moe_inputs(num_tokens, 8, 2, 72, 40, dtype, seed=5)
    ids32 = args[4].to(torch.int32)
    out = fused_moe(*args[:4], ids32, one_slot_per_tile=True, block_n=32, block_k=32)
    assert_close(out, fused_moe_reference(*args), dtype, scale=2.0)
    if num_tokens == 1:  # 2 slots * 4 <= 8 experts: the launcher picks this path by itself
        assert_close(fused_moe(*args), out, dtype)


def test_moe_triton_skewed_and_repeated_ids(assert_close) -> None:
    x, w_gate_up, w_down, weights, _ = moe_inputs(20, 4, 2, 48, 32, torch.float32)
    ids = torch.full((20, 2), 2, dtype=torch.int32)  # every slot on one expert, twice per token
    ids[0] = torch.tensor([0, 0], dtype=torch.int32)
    args = (x, w_gate_up, w_down, weights, ids)
    out = fused_moe(*args, block_m=16, block_n=16, block_k=16)
    assert_close(out, fused_moe_reference(*args), torch.float32)
    assert_close(fused_moe_reference(*args), naive_moe(*args), torch.float32, scale=4.0)


def test_moe_empty_batch() -> None:
    x, w_gate_up, w_down, weights, ids = moe_inputs(0, 4, 2, 48, 32, torch.float16)
    assert fused_moe(x, w_gate_up, w_down, weights, ids).shape == (0, 48)
    assert fused_moe_reference(x, w_gate_up, w_down, weights, ids).shape == (0, 48)


def test_moe_public_dispatch(monkeypatch, triton_path, assert_close) -> None:
    args = moe_inputs(5, 6, 2, 48, 32, torch.bfloat16)
    calls = []

    def recorded(*a, **kw):
        calls.append(kw)
        return fused_moe(*a, **kw)

    monkeypatch.setattr(kernels, "fused_moe_triton", recorded)
    out = kernels.fused_moe(*args)
    assert calls == [{"validate_ids": True}]  # checked unless the caller says the ids are sound
    assert_close(out, fused_moe_reference(*args), torch.bfloat16, scale=2.0)
    kernels.fused_moe(*args, validate_ids=False)  # router ids in a served step: no device sync
    assert calls[-1] == {"validate_ids": False}
    calls.clear()
    monkeypatch.setenv("RUYIFLOW_KERNELS", "reference")
    kernels.fused_moe(*args)
    assert not calls


def _bad_moe_args():
    x, wgu, wd, w, ids = moe_inputs(3, 4, 2, 32, 16, torch.float32)
    return [
        ((x[0], wgu, wd, w, ids), "expected x"),
        ((x, wgu[:, :31], wd, w, ids), "w_gate_up"),
        ((x, wgu, wd[:, :, :8], w, ids), "w_down"),
        ((x, wgu.half(), wd, w, ids), "share one of"),
        ((x, wgu, wd, w.double(), ids), "topk_weights must be float32"),
        ((x, wgu, wd, w[:, :1], ids), "topk_weights"),
        ((x, wgu, wd, w, ids.float()), "int32 or int64"),
        ((x, wgu, wd, w, ids[:2]), "topk_ids"),
        ((x, wgu.transpose(1, 2).contiguous().transpose(1, 2), wd, w, ids), "unit stride"),
        ((x, wgu, wd, w, ids + 3), r"outside \[0, 4\)"),
        ((x, wgu, wd, w, ids - 1), r"outside \[0, 4\)"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_moe_args())))
def test_moe_launcher_rejects_bad_inputs(case: int) -> None:
    args, message = _bad_moe_args()[case]
    with pytest.raises(ValueError, match=message):
        fused_moe(*args)


def test_kernels_compile_for_hopper(sm90_compile) -> None:
    pointers = [
        "a_ptr",
        "b_ptr",
        "c_ptr",
        "topk_weights_ptr",
        "sorted_slots_ptr",
        "block_experts_ptr",
        "num_padded_ptr",
    ]
    scalars = [
        "num_slots",
        "N",
        "K",
        "num_blocks_m",
        "stride_am",
        "stride_be",
        "stride_bn",
        "stride_cm",
    ]
    types = ["*bf16", "*bf16", "*bf16", "*fp32", "*i32", "*i64", "*i64"] + ["i32"] * len(scalars)
    bf16 = dict(zip(pointers + scalars, types, strict=True))
    fp32 = bf16 | {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32"}
    gemm1 = dict(
        A_ROW_DIV=8,
        SWIGLU=True,
        MUL_ROUTED_WEIGHT=False,
        DOT_F32=False,
        DOT_PRECISION=None,
        BLOCK_M=16,
        BLOCK_N=64,
        BLOCK_K=128,
        GROUP_M=1,
        ONE_SLOT_PER_TILE=False,
    )
    gemm2 = gemm1 | dict(
        A_ROW_DIV=1, SWIGLU=False, MUL_ROUTED_WEIGHT=True, BLOCK_M=64, BLOCK_K=64, GROUP_M=8
    )
    moe = dict(
        module="ruyiflow.kernels.fused_moe",
        kernel="fused_moe_kernel",
        options={"num_warps": 4, "num_stages": 3},
    )
    route_signature = {
        "logits_ptr": "*fp32",
        "bias_ptr": "*fp32",
        "weights_ptr": "*fp32",
        "ids_ptr": "*i64",
        "E": "i32",
        "stride_row": "i32",
        "scaling": "fp32",
    }
    deepseek = dict(
        TOP_K=8,
        SIGMOID=True,
        HAS_BIAS=True,
        RENORMALIZE=True,
        NUM_GROUPS=8,
        TOPK_GROUPS=4,
        BLOCK_E=256,
        BLOCK_K=8,
        BLOCK_G=8,
    )
    hunyuan = deepseek | dict(
        SIGMOID=False, HAS_BIAS=False, NUM_GROUPS=1, TOPK_GROUPS=1, BLOCK_E=64, BLOCK_G=1
    )
    route = dict(
        module="ruyiflow.kernels.moe_routing",
        kernel="route_experts_kernel",
        signature=route_signature,
        options={"num_warps": 4},
    )
    sm90_compile(
        [
            moe | dict(signature=bf16, constexprs=gemm1),
            moe | dict(signature=bf16 | {"c_ptr": "*fp32"}, constexprs=gemm2),
            moe | dict(signature=fp32, constexprs=gemm1 | {"DOT_PRECISION": "ieee"}),
            moe | dict(signature=bf16, constexprs=gemm1 | {"ONE_SLOT_PER_TILE": True}),
            route | dict(constexprs=deepseek),
            route | dict(constexprs=hunyuan),
        ]
    )
