"""Read Hugging Face safetensors checkpoints (one file, or shards with an index) tensor by tensor.

`SafetensorsCheckpoint` is a lazy `{key: tensor}` mapping: indexing a key reads that tensor's
bytes with a plain file read into a buffer of its own (never a memory map, whose touched pages
would count in the process's resident memory until it is closed), validated against the header.
The model builder converts each tensor to its device and dtype and drops it, so loading holds one
checkpoint tensor on the host at a time beside the model: a CUDA load never keeps a host copy of
the weights, a CPU load keeps only the model.

Format: 8 bytes little-endian header length N, N bytes of JSON `{key: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data; offsets count from the end
of the header.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ruyiflow.engine.errors import ModelLoadError

INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, validated against its index."""
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: corrupt index ({exc})") from exc
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index}: shard files missing: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"{path}: no model.safetensors, {INDEX_NAME} or *.safetensors found")
    return found


class Entry:
    """Where one tensor's bytes are: file, absolute byte range, dtype and shape."""

    __slots__ = ("begin", "dtype", "end", "file", "shape")

    def __init__(
        self, file: Path, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int
    ):
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end


def read_header(file: Path) -> dict[str, Entry]:
    """The entries of one safetensors file, each checked against the file's size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if not 0 < header_len <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_len} does not fit the file")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        entries = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            dtype = DTYPES.get(info.get("dtype"))
            shape = tuple(info.get("shape", ()))
            begin, end = info.get("data_offsets", (-1, -1))
            if dtype is None or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"tensor {key!r}: dtype {info.get('dtype')!r} shape {shape}")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            start = 8 + header_len
            if not (0 <= begin <= end and end - begin == nbytes and start + end <= size):
                raise ValueError(f"tensor {key!r}: bytes {begin}..{end} do not match its shape")
            entries[key] = Entry(file, dtype, shape, start + begin, start + end)
        return entries
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{file}: cannot read safetensors ({exc})") from exc


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """{key: tensor} over the files of a checkpoint; a tensor is read when indexed."""

    def __init__(self, path: Path):
        self._entries: dict[str, Entry] = {}
        for file in checkpoint_files(path):
            for key, entry in read_header(file).items():
                if key in self._entries:
                    raise ModelLoadError(f"{file.name}: tensor {key!r} appears in two shards")
                self._entries[key] = entry

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self._entries[key]
        data = torch.empty(e.end - e.begin, dtype=torch.uint8)
        view, done = memoryview(data.numpy()), 0
        try:
            with open(e.file, "rb", buffering=0) as f:
                while done < len(view):  # one read returns at most ~2 GiB on Linux
                    num = os.preadv(f.fileno(), [view[done:]], e.begin + done)
                    if num == 0:
                        raise ModelLoadError(f"{e.file}: tensor {key!r} is truncated")
                    done += num
        except OSError as exc:
            raise ModelLoadError(f"{e.file}: cannot read tensor {key!r} ({exc})") from exc
        return data.view(e.dtype).view(e.shape)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def nbytes(self) -> int:
        """Bytes of every tensor (the checkpoint's size on disk, less its headers)."""
        return sum(e.end - e.begin for e in self._entries.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def load_safetensors(path: Path) -> SafetensorsCheckpoint:
    """The checkpoint's tensors by key, read lazily; a key in two shards is an error."""
    return SafetensorsCheckpoint(path)
