"""A GGUF file's metadata and tensor table, read straight from an mmap.

The `gguf` package's reader builds a numpy memmap view per field part (~250k for a 49k-token
vocabulary), which costs seconds at every model load; here strings and scalars are unpacked with
`struct` from the mapped bytes and tensor data are plain ndarray views (no memmap subclass, whose
per-view bookkeeping also slows dequantisation ~3x). Every offset and length is checked against
the file's size: a truncated or corrupt file is a ModelLoadError, never a crash or a huge read.
Dequantisation is `gguf_quants` (and `gguf.quants` for the block types it leaves).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ruyiflow.engine.errors import ModelLoadError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
# value type -> struct format of a scalar (8 = string, 9 = array are handled apart)
SCALARS = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}  # fmt: skip
NUMPY_OF = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 10: "<u8",
            11: "<i8", 12: "<f8"}  # fmt: skip
STRING, ARRAY, BOOL = 8, 9, 7


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # the raw bytes (uint8), a view of the mapped file

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def rows(self) -> np.ndarray:
        """The raw bytes as [rows, bytes of one row], the layout `gguf.quants` decodes."""
        return self.data.reshape(self.num_elements // self.shape[0], -1)


class GGUFFile:
    """`metadata` (key -> int / float / bool / str / list) and `tensors` of a GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise ModelLoadError(f"{self.path}: cannot read it as a GGUF file ({exc})") from exc
        self._pos = 0
        try:
            self.metadata, self.tensors = self._parse()
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError, KeyError) as exc:
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({exc})") from exc

    # -- primitive reads, bounds-checked ------------------------------------------------------
    def _take(self, size: int) -> int:
        start = self._pos
        if size < 0 or start + size > len(self._map):
            raise ValueError(f"truncated at byte {start} (wanted {size} more)")
        self._pos = start + size
        return start

    def _scalar(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        return struct.unpack_from("<" + fmt, self._map, self._take(size))[0]

    def _string(self) -> str:
        size = self._scalar("Q")
        start = self._take(size)
        return self._map[start : start + size].decode("utf-8")

    def _value(self, kind: int) -> Any:
        if kind in SCALARS:
            return self._scalar(SCALARS[kind])
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            inner, count = self._scalar("I"), self._scalar("Q")
            if inner == STRING:
                return [self._string() for _ in range(count)]
            if inner in NUMPY_OF:  # one frombuffer, not `count` unpacks
                dtype = np.dtype(NUMPY_OF[inner])
                start = self._take(count * dtype.itemsize)
                return np.frombuffer(self._map, dtype, count, start).tolist()
            if inner == BOOL:
                start = self._take(count)
                return [bool(b) for b in self._map[start : start + count]]
            raise ValueError(f"array of value type {inner} unsupported")
        raise ValueError(f"unknown metadata value type {kind}")

    # -- the file ----------------------------------------------------------------------------
    def _parse(self) -> tuple[dict[str, Any], list[TensorInfo]]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if self._map[:4] != MAGIC:
            raise ValueError("bad magic (not GGUF)")
        self._pos = 4
        version = self._scalar("I")
        if version not in VERSIONS:  # a big-endian file reads as a huge version number here
            raise ValueError(f"GGUF version {version} unsupported (only {VERSIONS}, little-endian)")
        num_tensors, num_kv = self._scalar("Q"), self._scalar("Q")
        metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._string()
            metadata[key] = self._value(self._scalar("I"))
        layout = []
        for _ in range(num_tensors):
            name = self._string()
            num_dims = self._scalar("I")
            if num_dims > MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {num_dims} dimensions")
            shape = tuple(self._scalar("Q") for _ in range(num_dims))
            kind, offset = self._scalar("I"), self._scalar("Q")
            layout.append((name, shape, GGMLQuantizationType(kind), offset))
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        tensors = []
        for name, shape, kind, offset in layout:
            block, block_bytes = GGML_QUANT_SIZES[kind]
            count = int(np.prod(shape, dtype=np.int64))
            if count % block or (shape and shape[0] % block):
                raise ValueError(f"tensor {name!r}: {shape} is not whole {kind.name} blocks")
            size = count // block * block_bytes
            start = data_start + offset
            if start + size > len(self._map):
                raise ValueError(f"tensor {name!r} runs past the end of the file")
            data = np.frombuffer(self._map, np.uint8, size, start)
            tensors.append(TensorInfo(name, shape, kind, data))
        return metadata, tensors

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)
