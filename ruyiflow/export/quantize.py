"""Weight quantization of a branch graph, applied to the graph before its weights are written, so
each weight is quantized as it streams to disk (constant memory, no 2 GB proto, seconds not
minutes).

- int8: what `onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8)`
  writes for a MatMul: symmetric per-output-channel int8 weights and the same node pattern
  (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul), which ORT fuses into
  DynamicQuantizeMatMul at load. Its per-channel Python loop takes ~15 s on SmolLM2; this
  vectorised copy of its arithmetic gives the same bytes (checked in tests/onnx).
- int4: block-wise symmetric 4-bit weight-only `MatMulNBits` (com.microsoft), packed by
  onnxruntime's own MatMulNBits quantizer kernel; block 32 (block 128 lost a fifth of the
  top-1 agreement with float32 on SmolLM2 for no speed gain), accuracy level 4 (int8 compute).
The head is quantized too unless asked otherwise (it is the largest single matrix: without it,
int8 decode at SmolLM2 exit 12 ran at ~0.6x the speed). The embedding Gather stays float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from onnx import NodeProto, TensorProto, helper

from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.export.onnx_graph import BranchGraph, Derived, TorchWeight

INT4_BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4
MS_DOMAIN = "com.microsoft"


def quantize_graph(graph: BranchGraph, quant: str, quantize_head: bool = True) -> dict[str, Any]:
    """Replace every MatMul over a 2-D model weight (the head only if `quantize_head`) by its
    quantized form, in place. Returns the settings used (recorded in the manifest)."""
    if quant not in ("int8", "int4"):
        raise InvalidRequest(f"quant {quant!r} unknown; choose int8 or int4")
    rewrite = _int8_nodes if quant == "int8" else _int4_nodes
    nodes: list[NodeProto] = []
    for node in graph.nodes:
        weight = graph.weights.get(node.input[1]) if node.op_type == "MatMul" else None
        is_head = "logits" in node.output
        if isinstance(weight, TorchWeight) and (quantize_head or not is_head):
            del graph.weights[node.input[1]]
            nodes += rewrite(graph, node, weight)
        else:
            nodes.append(node)
    graph.nodes[:] = nodes
    if quant == "int8":
        details = {"method": "dynamic (quantize_dynamic layout)", "weights": "int8 per channel"}
    else:
        details = {
            "method": "MatMulNBits",
            "bits": 4,
            "block_size": INT4_BLOCK_SIZE,
            "symmetric": True,
            "accuracy_level": INT4_ACCURACY_LEVEL,
        }
    return details | {"head_quantized": quantize_head, "embedding": "float32"}


class _Once:
    """Runs `compute` once for several initializers that come from one weight, and forgets the
    result after the last of them was written."""

    def __init__(self, compute: Callable[[], tuple[np.ndarray, ...]], num_parts: int):
        self.compute = compute
        self.left = num_parts
        self.result: tuple[np.ndarray, ...] | None = None

    def part(self, index: int, nbytes: int) -> Derived:
        return Derived(lambda: self._take(index), nbytes)

    def _take(self, index: int) -> np.ndarray:
        if self.result is None:
            self.result = self.compute()
        out = self.result[index]
        self.left -= 1
        if self.left == 0:
            self.result = None
        return out


def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w float32 [K, N] -> (int8 [K, N], scale float32 [N]) with w ~ q * scale, as
    onnxruntime's per-channel symmetric QInt8 weights (range -127..127, ties to even)."""
    absmax = np.maximum(np.abs(w.min(axis=0)), np.abs(w.max(axis=0)))
    scale = 2.0 * absmax.astype(np.float64) / 254.0
    scale = np.where(scale < np.finfo(np.float32).tiny, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def _int8_nodes(graph: BranchGraph, node: NodeProto, weight: TorchWeight) -> list[NodeProto]:
    name, (k, n) = node.input[1], weight.shape
    x, y, p = node.input[0], node.output[0], node.name
    once = _Once(lambda: int8_per_channel(weight.numpy()), 2)
    w_q, w_scale, w_zero = f"{name}_quantized", f"{name}_scale", f"{name}_zero_point"
    graph.weights[w_q] = once.part(0, k * n)
    graph.weights[w_scale] = once.part(1, 4 * n)
    graph.weights[w_zero] = np.zeros(n, np.int8)
    xq, xs, xz = f"{p}/x_quantized", f"{p}/x_scale", f"{p}/x_zero_point"
    return [
        helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=f"{p}/quantize_x"),
        helper.make_node("Mul", [xs, w_scale], [f"{p}/scales"], name=f"{p}/scales"),
        helper.make_node("MatMulInteger", [xq, w_q, xz, w_zero], [f"{p}/int32"], name=p),
        helper.make_node(
            "Cast", [f"{p}/int32"], [f"{p}/float"], name=f"{p}/cast", to=TensorProto.FLOAT
        ),
        helper.make_node("Mul", [f"{p}/float", f"{p}/scales"], [y], name=f"{p}/rescale"),
    ]


def int4_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w float32 [K, N] -> (packed uint8 [N, K/block, block/2], scales float32 [N, K/block]),
    symmetric, by onnxruntime's MatMulNBits quantizer kernel."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=INT4_BLOCK_SIZE, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL
    )
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(w)
    return packed, scales


def _int4_nodes(graph: BranchGraph, node: NodeProto, weight: TorchWeight) -> list[NodeProto]:
    name, (k, n) = node.input[1], weight.shape
    blocks = -(-k // INT4_BLOCK_SIZE)
    once = _Once(lambda: int4_blocks(weight.numpy()), 2)
    w_q, w_scale = f"{name}_Q4", f"{name}_scales"
    graph.weights[w_q] = once.part(0, n * blocks * INT4_BLOCK_SIZE // 2)
    graph.weights[w_scale] = once.part(1, 4 * n * blocks)
    return [
        helper.make_node(
            "MatMulNBits",
            [node.input[0], w_q, w_scale],
            list(node.output),
            name=node.name,
            domain=MS_DOMAIN,
            K=k,
            N=n,
            bits=4,
            block_size=INT4_BLOCK_SIZE,
            accuracy_level=INT4_ACCURACY_LEVEL,
        )
    ]
