"""Handoff state: a running sequence as bytes, written and checked once for every runner.

Layout: safetensors (an 8-byte little-endian header length, a JSON header, then raw
little-endian tensor bytes; never pickle). The header's `__metadata__["ruyiflow"]` is a JSON
object with token ids, exit, sampling parameters, counters, the model fingerprint and the dtype
of the float tensors. Tensors:

- mode `hidden`: `boundary` [T, hidden] (the hidden state entering layer `exit` for the T cached
  positions) and `trunk.{i}.k` / `trunk.{i}.v` [kv_heads, T, head_dim] for trunk layers i < exit;
- both modes: `rng` uint8 [n], the request's generator state (same seed => same continuation);
  optional (an ONNX Runtime node writes none: the importer reseeds from `seed`).

Torch-free: tensors travel as `RawTensor` (dtype name, shape, bytes); each runner converts them
to its own arrays. `decode_state` checks everything before any runner touches the data: framing,
version, fingerprint, exit, token ids, counters, tensor names, dtypes, shapes, offsets and
finiteness. Any failure raises `HandoffError` (or `ModelMismatch` for other weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ruyiflow.engine.errors import HandoffError, ModelMismatch
from ruyiflow.engine.sampling_params import SamplingParams

VERSION = 1
MODES = ("hidden", "tokens")
FLOAT_DTYPES = ("F32", "BF16", "F16")
ITEM_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1}
MAX_RNG_BYTES = 1 << 16  # a generator's state is a few KB (torch's mt19937: 5056 bytes)
_ALIGN = 8  # header padded so tensor data starts 8-byte aligned (as safetensors writes it)


@dataclass(frozen=True)
class RawTensor:
    """One tensor as bytes: safetensors dtype name, shape, little-endian row-major data."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @property
    def num_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ITEM_BYTES[self.dtype]


@dataclass
class HandoffState:
    """A validated state: metadata, and (hidden mode) the boundary states and trunk KV."""

    mode: str
    fingerprint: str
    exit: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    num_emitted_chars: int
    dtype: str  # dtype name of the float tensors
    tensors: dict[str, RawTensor] = field(default_factory=dict)  # boundary, trunk.{i}.{k,v}
    rng: bytes | None = None  # the generator state; None: reseed from `seed`

    @property
    def num_cached(self) -> int:
        return len(self.token_ids) - 1

    def meta_json(self) -> str:
        return json.dumps(
            {
                "version": VERSION,
                "mode": self.mode,
                "fingerprint": self.fingerprint,
                "exit": self.exit,
                "token_ids": self.token_ids,
                "num_prompt_tokens": self.num_prompt_tokens,
                "params": self.params.to_dict(),
                "seed": self.seed,
                "num_emitted_chars": self.num_emitted_chars,
                "dtype": self.dtype,
            }
        )


@dataclass(frozen=True)
class ModelFacts:
    """What the receiving model checks a state against."""

    fingerprint: str
    exits: tuple[int, ...]
    vocab_size: int
    max_context: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int


# -- encoding ---------------------------------------------------------------------------------
def encode_state(state: HandoffState) -> bytes:
    """Safetensors bytes of `state` (tensors in name order, then `rng`)."""
    tensors = dict(sorted(state.tensors.items()))
    if state.rng is not None:
        tensors["rng"] = RawTensor("U8", (len(state.rng),), state.rng)
    return _frame(tensors, state.meta_json())


def _frame(tensors: dict[str, RawTensor], meta_json: str) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"ruyiflow": meta_json}}
    offset = 0
    for name, t in tensors.items():
        if len(t.data) != t.num_bytes:
            raise HandoffError(f"tensor {name!r}: {len(t.data)} bytes for shape {t.shape}")
        header[name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.num_bytes],
        }
        offset += t.num_bytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % _ALIGN)
    return b"".join(
        [len(raw).to_bytes(8, "little"), raw, *(bytes(t.data) for t in tensors.values())]
    )


def to_tokens_mode(data: bytes) -> bytes:
    """Re-encode a state as `tokens` mode (drop every tensor but the RNG state)."""
    header, meta = _header(data)
    if meta.get("mode") == "tokens":
        return data
    meta["mode"] = "tokens"
    tensors = {}
    if "rng" in header:
        rng = _tensor(data, header, "rng")
        tensors["rng"] = rng
    return _frame(tensors, json.dumps(meta))


# -- decoding ---------------------------------------------------------------------------------
def peek_metadata(data: bytes) -> dict[str, Any]:
    """The metadata object of an encoded state, without reading tensors (not validated)."""
    return _header(data, check_framing=False)[1]


def decode_state(data: bytes, facts: ModelFacts) -> HandoffState:
    """Parse and validate a state against the receiving model's facts."""
    header, meta = _header(data)
    state = check_meta(meta, facts)
    t = state.num_cached
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    if state.mode == "hidden":
        expected["boundary"] = (state.dtype, (t, facts.hidden_size))
        kv_shape = (facts.num_kv_heads, t, facts.head_dim)
        for i in range(state.exit):
            expected[f"trunk.{i}.k"] = (state.dtype, kv_shape)
            expected[f"trunk.{i}.v"] = (state.dtype, kv_shape)
    names = {k for k in header if k != "__metadata__"}
    missing = sorted(set(expected) - names)
    extra = sorted(names - set(expected) - {"rng"})
    if missing or extra:
        raise HandoffError(f"handoff state: tensors missing {missing[:4]} / unexpected {extra[:4]}")
    for name, (dtype, shape) in expected.items():
        tensor = _tensor(data, header, name)
        if tensor.dtype != dtype:
            raise HandoffError(
                f"handoff state: tensor {name!r} has dtype {tensor.dtype}, expected {dtype}"
            )
        if tensor.shape != shape:
            raise HandoffError(
                f"handoff state: tensor {name!r} has shape {tensor.shape}, expected {shape}"
            )
        if not is_finite(tensor):
            raise HandoffError(f"handoff state: tensor {name!r} has non-finite values")
        state.tensors[name] = tensor
    if "rng" in names:
        rng = _tensor(data, header, "rng")
        if rng.dtype != "U8" or len(rng.shape) != 1 or not 0 < rng.shape[0] <= MAX_RNG_BYTES:
            raise HandoffError("handoff state: tensor 'rng' must be uint8 [n] (n <= 65536)")
        state.rng = bytes(rng.data)
    return state


def _need(meta: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in meta:
        raise HandoffError(f"handoff state: field {key!r} missing")
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise HandoffError(f"handoff state: field {key!r} has the wrong type")
    return value


def check_meta(meta: dict[str, Any], facts: ModelFacts) -> HandoffState:
    """Validate the metadata object (tensors aside) against the receiving model's facts."""
    if _need(meta, "version", int) != VERSION:
        raise HandoffError(f"handoff state version {meta['version']} unsupported (want {VERSION})")
    mode = _need(meta, "mode", str)
    if mode not in MODES:
        raise HandoffError(f"handoff state: unknown mode {mode!r}")
    state_fp = _need(meta, "fingerprint", str)
    if mode == "hidden" and state_fp != facts.fingerprint:
        raise ModelMismatch(
            f"hidden-state handoff made for model {state_fp}, this node serves "
            f"{facts.fingerprint}; only tokens mode can cross models"
        )
    exit_layer = _need(meta, "exit", int)
    if exit_layer not in facts.exits:
        raise HandoffError(
            f"handoff state: exit {exit_layer} is not an exit of this model {list(facts.exits)}"
        )
    token_ids = _need(meta, "token_ids", list)
    vocab = facts.vocab_size
    if not token_ids or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in token_ids
    ):
        raise HandoffError(
            f"handoff state: token ids empty or outside the vocabulary 0..{vocab - 1}"
        )
    if len(token_ids) >= facts.max_context:
        raise HandoffError(
            f"handoff state: {len(token_ids)} tokens exceed the context length {facts.max_context}"
        )
    num_prompt = _need(meta, "num_prompt_tokens", int)
    if not 1 <= num_prompt <= len(token_ids):
        raise HandoffError("handoff state: num_prompt_tokens out of range")
    params = SamplingParams.from_dict(_need(meta, "params", dict))
    seed = _need(meta, "seed", int)
    emitted = _need(meta, "num_emitted_chars", int)
    if emitted < 0:
        raise HandoffError("handoff state: num_emitted_chars is negative")
    dtype = _need(meta, "dtype", str)
    if dtype not in FLOAT_DTYPES:
        raise HandoffError(f"handoff state: dtype {dtype!r} unsupported")
    return HandoffState(
        mode, state_fp, exit_layer, token_ids, num_prompt, params, seed, emitted, dtype
    )


def _header(data: bytes, check_framing: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(safetensors header, ruyiflow metadata) of an encoded state; with `check_framing`, the
    tensor data must fill the rest of the payload exactly (as safetensors requires)."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        if not 2 <= header_len <= len(data) - 8:
            raise ValueError(f"header length {header_len} outside the payload")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        meta = json.loads(header["__metadata__"]["ruyiflow"])
    except Exception as exc:
        raise HandoffError(f"handoff state is not a valid payload: {exc}") from exc
    if not isinstance(header, dict) or not isinstance(meta, dict):
        raise HandoffError("handoff state: header or metadata is not an object")
    if not check_framing:
        return header, meta
    try:  # safetensors' framing: tensor data fills the rest of the payload exactly
        ends = [int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__"]
    except Exception as exc:
        raise HandoffError(f"handoff state is not a valid payload: bad entry ({exc})") from exc
    if max(ends, default=0) != len(data) - 8 - header_len:
        raise HandoffError(
            f"handoff state is not a valid payload: {len(data) - 8 - header_len} bytes of "
            f"tensor data, the header describes {max(ends, default=0)} (truncated?)"
        )
    return header, meta


def _tensor(data: bytes, header: dict[str, Any], name: str) -> RawTensor:
    """Tensor `name` read from the header's offsets (a view of `data`, checked to fit)."""
    entry = header[name]
    try:
        dtype = str(entry["dtype"])
        shape = tuple(int(d) for d in entry["shape"])
        start, end = (int(x) for x in entry["data_offsets"])
    except Exception as exc:
        raise HandoffError(f"handoff state: tensor {name!r} has a bad header") from exc
    base = 8 + int.from_bytes(data[:8], "little")
    if dtype not in ITEM_BYTES or any(d < 0 for d in shape):
        raise HandoffError(f"handoff state: tensor {name!r} has dtype {dtype} / shape {shape}")
    tensor = RawTensor(dtype, shape, memoryview(data)[base + start : base + end])
    if not 0 <= start <= end <= len(data) - base or end - start != tensor.num_bytes:
        raise HandoffError(f"handoff state: tensor {name!r} lies outside the payload")
    return tensor


def is_finite(tensor: RawTensor) -> bool:
    """No inf or NaN in a float tensor (bfloat16 checked on its exponent bits)."""
    if tensor.dtype == "BF16":
        bits = np.frombuffer(tensor.data, dtype="<u2")
        return not bool(((bits & 0x7F80) == 0x7F80).any())  # exponent all ones: inf / NaN
    if tensor.dtype in ("F32", "F16"):
        values = np.frombuffer(tensor.data, dtype="<f4" if tensor.dtype == "F32" else "<f2")
        return bool(np.isfinite(values).all())
    return True
