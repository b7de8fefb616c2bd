"""The ONNX graph of one branch (exit e), built with `onnx.helper` from a FamilyModel's own tensors.

embedding -> trunk layers 0..e-1 -> branch layer -> branch norm -> head, for `new_len` tokens of
`batch` rows over a KV cache of `past_len` positions. Standard opset-23 ops only: RMSNormalization,
RotaryEmbedding (cos/sin tables as initializers) and Attention (GQA, past/present KV, an additive
mask built once from `attention_mask` and causality within the new tokens). The branch layer runs
its attention output, MLP, norm and head on the last new position only: only its KV is needed for
the other positions. Weights are returned as numpy arrays in MatMul layout ([in, out]); the
exporter decides where they are stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from onnx import GraphProto, NodeProto, TensorProto, ValueInfoProto, helper

from ruyiflow.engine.layers import LayerWeights
from ruyiflow.engine.model import FamilyModel
from ruyiflow.engine.rope import RopeTable

OPSET = 23
IR_VERSION = 11  # the IR version of opset 23 (onnx 1.18)
MASKED = float(np.finfo(np.float32).min)  # not -inf: a fully padded row stays finite
BATCH, NEW, PAST, TOTAL = "batch", "new_len", "past_len", "total_len"


@dataclass(frozen=True)
class TorchWeight:
    """A model tensor converted to a float32 numpy array only when written (no second copy of
    every weight in memory while the graph is built)."""

    tensor: torch.Tensor
    transpose: bool = False  # torch [out, in] -> MatMul [in, out]

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.tensor.shape)
        return shape[::-1] if self.transpose else shape

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * 4

    def numpy(self) -> np.ndarray:
        t = self.tensor.detach().to(torch.float32)
        return np.ascontiguousarray((t.T if self.transpose else t).numpy())


class Derived:
    """An initializer computed when written (a quantized weight or its scales)."""

    def __init__(self, compute: Callable[[], np.ndarray], nbytes: int):
        self.compute = compute
        self.nbytes = nbytes  # an estimate, for progress reports

    def numpy(self) -> np.ndarray:
        return self.compute()


Weight = TorchWeight | Derived | np.ndarray


def as_array(weight: Weight) -> np.ndarray:
    return weight if isinstance(weight, np.ndarray) else weight.numpy()


@dataclass
class BranchGraph:
    nodes: list[NodeProto] = field(default_factory=list)
    inputs: list[ValueInfoProto] = field(default_factory=list)
    outputs: list[ValueInfoProto] = field(default_factory=list)
    weights: dict[str, Weight] = field(default_factory=dict)  # initializers, in order
    num_kv_layers: int = 0

    def graph(self, initializers: list[TensorProto], name: str) -> GraphProto:
        return helper.make_graph(
            self.nodes, name, self.inputs, self.outputs, initializer=initializers
        )


def kv_names(prefix: str, index: int) -> tuple[str, str]:
    """(`{prefix}.{i}.key`, `{prefix}.{i}.value`); prefix `past` or `present`."""
    return f"{prefix}.{index}.key", f"{prefix}.{index}.value"


def _np(t: torch.Tensor, transpose: bool = False) -> TorchWeight:
    return TorchWeight(t, transpose)


class _Builder:
    def __init__(self, graph: BranchGraph):
        self.g = graph
        self.count = 0

    def weight(self, name: str, array: Weight) -> str:
        if name in self.g.weights:
            raise ValueError(f"duplicate initializer {name}")
        self.g.weights[name] = array
        return name

    def const_i64(self, name: str, value: int | list[int]) -> str:
        """An int64 constant (a scalar for an int, 1-D for a list), shared by name."""
        if name not in self.g.weights:
            self.g.weights[name] = np.asarray(value, dtype=np.int64)
        return name

    def op(self, op_type: str, inputs: list[str], scope: str, outputs: int = 1, **attrs):
        """Append a node named `{scope}/{op}_{n}`; returns its output name (a list if several)."""
        self.count += 1
        node_name = f"{scope}/{op_type}_{self.count}"
        names = [node_name] if outputs == 1 else [f"{node_name}:{k}" for k in range(outputs)]
        self.g.nodes.append(helper.make_node(op_type, inputs, names, name=node_name, **attrs))
        return names[0] if outputs == 1 else names

    def named(self, op_type: str, inputs: list[str], out: str, **attrs) -> str:
        self.g.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def build_branch_graph(
    model: FamilyModel, exit_layer: int, max_context: int, separate_head: bool
) -> BranchGraph:
    """The branch graph for `exit_layer`. `separate_head`: store the head as its own [hidden,
    vocab] MatMul weight (so a quantizer reaches it) instead of a Gemm over the tied embedding."""
    c = model.config
    c.check_exit(exit_layer)
    g = BranchGraph(num_kv_layers=exit_layer + 1)
    b = _Builder(g)
    H, KVH, D, eps = c.num_heads, c.num_kv_heads, c.head_dim, c.rms_norm_eps
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    g.inputs += [
        helper.make_tensor_value_info("input_ids", i64, [BATCH, NEW]),
        helper.make_tensor_value_info("position_ids", i64, [BATCH, NEW]),
        helper.make_tensor_value_info("attention_mask", i64, [BATCH, TOTAL]),
    ]
    for i in range(g.num_kv_layers):
        for name in kv_names("past", i):
            g.inputs.append(helper.make_tensor_value_info(name, f32, [BATCH, KVH, PAST, D]))
    g.outputs.append(helper.make_tensor_value_info("logits", f32, [BATCH, c.vocab_size]))
    g.outputs.append(helper.make_tensor_value_info("boundary", f32, [BATCH, NEW, c.hidden_size]))
    for i in range(g.num_kv_layers):
        for name in kv_names("present", i):
            g.outputs.append(helper.make_tensor_value_info(name, f32, [BATCH, KVH, TOTAL, D]))

    # RoPE tables [max_context, D/2]: the torch table's first half is cos(pos * inv_freq) and
    # its sign-folded sin's second half is sin(pos * inv_freq); same float32 values.
    rope = RopeTable(model.rope.inv_freq, torch.float32, model.rope.attention_factor, max_context)
    half = D // 2
    cos = b.weight("rope.cos", rope.cos[:, :half].contiguous().numpy())
    sin = b.weight("rope.sin", rope.sin[:, half:].contiguous().numpy())
    mask = _attention_bias(b)

    embed = b.weight("embed_tokens", _np(model.embed))
    h = b.op("Gather", [embed, "input_ids"], "embed", axis=0)  # [B, S, hidden]
    for i in range(exit_layer):
        h = _layer(b, model.layers[i], f"layers.{i}", i, h, mask, cos, sin, (H, KVH, D, eps))
    h = b.named("Identity", [h], "boundary")
    branch = model.branches[exit_layer]
    prefix = f"branch.{exit_layer}"
    h = _layer(
        b, branch.layer, prefix, exit_layer, h, mask, cos, sin, (H, KVH, D, eps), last_only=True
    )
    # h [B, 1, hidden] -> [B, hidden]
    h = b.op("Squeeze", [h, b.const_i64("axes.1", [1])], prefix)
    x = b.op(
        "RMSNormalization",
        [h, b.weight(f"{prefix}.norm", _np(branch.norm))],
        prefix,
        axis=-1,
        epsilon=eps,
    )
    tied = branch.head.data_ptr() == model.embed.data_ptr()
    if separate_head:
        head = b.weight(f"{prefix}.head.weight", _np(branch.head, transpose=True))
        b.named("MatMul", [x, head], "logits")
    else:
        head = embed if tied else b.weight(f"{prefix}.head.weight", _np(branch.head))
        b.named("Gemm", [x, head], "logits", transB=1)
    return g


def _attention_bias(b: _Builder) -> str:
    """[B, 1, S, T] float additive mask: 0 where new row s may see key t (t <= P + s and
    attention_mask[b, t] == 1), MASKED elsewhere. P = T - S."""
    scope = "mask"
    zero, one = b.const_i64("i64.0d.0", 0), b.const_i64("i64.0d.1", 1)
    new_len = b.op("Gather", [b.op("Shape", ["input_ids"], scope), one], scope, axis=0)
    total = b.op("Gather", [b.op("Shape", ["attention_mask"], scope), one], scope, axis=0)
    past = b.op("Sub", [total, new_len], scope)  # scalars
    keys = b.op("Range", [zero, total, one], scope)  # [T]
    rows = b.op("Range", [past, total, one], scope)  # [S]: position of each new row in the cache
    axes0, axes1 = b.const_i64("axes.0", [0]), b.const_i64("axes.1", [1])
    causal = b.op(
        "LessOrEqual",
        [b.op("Unsqueeze", [keys, axes0], scope), b.op("Unsqueeze", [rows, axes1], scope)],
        scope,
    )  # [S, T]
    pad = b.op("Cast", ["attention_mask"], scope, to=TensorProto.BOOL)
    pad = b.op("Unsqueeze", [pad, b.const_i64("axes.1.2", [1, 2])], scope)  # [B, 1, 1, T]
    allowed = b.op("And", [causal, pad], scope)  # [B, 1, S, T]
    zeros = b.weight("mask.zero", np.zeros((), np.float32))
    masked = b.weight("mask.masked", np.full((), MASKED, np.float32))
    return b.op("Where", [allowed, zeros, masked], scope)


def _layer(
    b: _Builder,
    w: LayerWeights,
    p: str,
    kv_index: int,
    h: str,
    mask: str,
    cos: str,
    sin: str,
    geo: tuple[int, int, int, float],
    last_only: bool = False,
) -> str:
    """One pre-norm decoder layer; h [B, S, hidden] -> [B, S, hidden] ([B, 1, hidden] with
    `last_only`). Writes present.{kv_index}.key/value."""
    H, KVH, D, eps = geo
    x = b.op(
        "RMSNormalization",
        [h, b.weight(f"{p}.input_norm", _np(w.input_norm))],
        p,
        axis=-1,
        epsilon=eps,
    )
    qkv = b.op("MatMul", [x, b.weight(f"{p}.qkv.weight", _np(w.w_qkv, transpose=True))], p)
    if w.b_qkv is not None:
        qkv = b.op("Add", [qkv, b.weight(f"{p}.qkv.bias", _np(w.b_qkv))], p)
    sizes = b.const_i64(f"split.{H}.{KVH}.{D}", [H * D, KVH * D, KVH * D])
    q, k, v = b.op("Split", [qkv, sizes], p, outputs=3, axis=-1)  # [B, S, heads * D]
    if w.q_norm is not None:
        q = _head_norm(b, q, b.weight(f"{p}.q_norm", _np(w.q_norm)), H, D, eps, p)
        k = _head_norm(b, k, b.weight(f"{p}.k_norm", _np(w.k_norm)), KVH, D, eps, p)
    q = b.op("RotaryEmbedding", [q, cos, sin, "position_ids"], p, num_heads=H)
    k = b.op("RotaryEmbedding", [k, cos, sin, "position_ids"], p, num_heads=KVH)
    if last_only:
        q = _last(b, q, axis=1, scope=p)  # [B, 1, H*D]
        mask = _last(b, mask, axis=2, scope=p)  # [B, 1, 1, T]
        h = _last(b, h, axis=1, scope=p)
    past_k, past_v = kv_names("past", kv_index)
    pres_k, pres_v = kv_names("present", kv_index)
    attn = f"{p}/attention"
    b.g.nodes.append(
        helper.make_node(
            "Attention",
            [q, k, v, mask, past_k, past_v],
            [attn, pres_k, pres_v],
            name=attn,
            q_num_heads=H,
            kv_num_heads=KVH,
            scale=D**-0.5,
        )
    )
    o = b.op("MatMul", [attn, b.weight(f"{p}.o.weight", _np(w.w_o, transpose=True))], p)
    h = b.op("Add", [h, o], p)
    x = b.op(
        "RMSNormalization",
        [h, b.weight(f"{p}.post_norm", _np(w.post_norm))],
        p,
        axis=-1,
        epsilon=eps,
    )
    gate_up = b.op("MatMul", [x, b.weight(f"{p}.gate_up.weight", _np(w.w_gate_up, True))], p)
    gate, up = b.op("Split", [gate_up], p, outputs=2, axis=-1, num_outputs=2)
    act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate], p)], p), up], p)  # SiLU * up
    down = b.op("MatMul", [act, b.weight(f"{p}.down.weight", _np(w.w_down, transpose=True))], p)
    return b.op("Add", [h, down], p)


def _head_norm(b: _Builder, x: str, weight: str, heads: int, D: int, eps: float, p: str) -> str:
    """Qwen3's per-head RMSNorm: [B, S, heads*D] -> [B, S, heads, D] -> norm -> back."""
    split = b.op("Reshape", [x, b.const_i64(f"shape.0.0.{heads}.{D}", [0, 0, heads, D])], p)
    normed = b.op("RMSNormalization", [split, weight], p, axis=-1, epsilon=eps)
    return b.op("Reshape", [normed, b.const_i64(f"shape.0.0.{heads * D}", [0, 0, heads * D])], p)


def _last(b: _Builder, x: str, axis: int, scope: str) -> str:
    starts, ends = b.const_i64("i64.-1", [-1]), b.const_i64("i64.max", [np.iinfo(np.int64).max])
    return b.op("Slice", [x, starts, ends, b.const_i64(f"axes.{axis}", [axis])], scope)
