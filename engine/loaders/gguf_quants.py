"""float32 from a GGUF tensor's raw blocks. The block formats the embedded model and most small
GGUF files use (Q4_0, Q4_1, Q8_0, F32/F16/BF16) are decoded here over the whole tensor at once, in
the same float32 operations as `gguf.quants` (equal bit for bit, tested); other types go to
`gguf.quants`, whose per-row-group loop is ~10x slower on these.

Block layouts (32 values each): Q4_0 = f16 d, 16 B nibbles, x = d * (q - 8); Q4_1 = f16 d, f16 m,
16 B nibbles, x = d * q + m; Q8_0 = f16 d, 32 int8, x = d * q. Nibble j of a block is the low
half of byte j for j < 16 and the high half of byte j - 16 after.
"""

from __future__ import annotations

import numpy as np

from ruyiflow.engine.loaders.gguf_file import TensorInfo


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] uint8 -> [blocks, 32] float32 in block order (low halves, then high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _scale(raw: np.ndarray) -> np.ndarray:
    """[blocks, 2] uint8 (a little-endian f16) -> [blocks, 1] float32."""
    return raw.copy().view("<f2").astype(np.float32)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks[:, :2]) * (_nibbles(blocks[:, 2:]) - np.float32(8))


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks[:, :2]) * _nibbles(blocks[:, 4:]) + _scale(blocks[:, 2:4])


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return _scale(blocks[:, :2]) * blocks[:, 2:].view(np.int8).astype(np.float32)


FAST = {"Q4_0": (18, _q4_0), "Q4_1": (20, _q4_1), "Q8_0": (34, _q8_0)}


def dequantize(t: TensorInfo) -> np.ndarray:
    """The tensor as a new float32 array (owned and writable, never a view of the file), flat
    (GGUF order: fastest dimension last after reshaping by the reversed shape). ValueError /
    NotImplementedError for a type neither path decodes."""
    kind = t.tensor_type.name
    if kind == "F32":
        return t.data.view("<f4").astype(np.float32)
    if kind == "F16":
        return t.data.view("<f2").astype(np.float32)
    if kind == "BF16":  # the high half of a float32
        return (t.data.view("<u2").astype(np.uint32) << 16).view(np.float32)
    if kind in FAST:
        block_bytes, decode = FAST[kind]
        return decode(t.data.reshape(-1, block_bytes)).reshape(-1)
    from gguf.quants import dequantize as slow

    return np.array(slow(t.rows(), t.tensor_type), dtype=np.float32).reshape(-1)
