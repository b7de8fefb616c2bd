"""Handoff state metadata, torch-free: the JSON header every backend writes and checks, and the
raw safetensors framing (the ONNX Runtime edge node encodes states without PyTorch).

Layout (see `engine.handoff`): safetensors bytes - an 8-byte little-endian header length, a JSON
header whose `__metadata__["ruyiflow"]` is a JSON object, then raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from ruyiflow.engine.errors import HandoffError, ModelMismatch
from ruyiflow.engine.sampling_params import SamplingParams
from safetensors.numpy import save as np_save

VERSION = 1
MODES = ("hidden", "tokens")
DTYPE_NAMES = ("F32", "BF16", "F16")


@dataclass
class StateMeta:
    """Validated metadata of a state (tensors aside)."""

    mode: str
    fingerprint: str
    exit: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    num_emitted_chars: int
    dtype: str  # safetensors dtype name of the float tensors

    @property
    def num_cached(self) -> int:
        return len(self.token_ids) - 1

    def to_json(self) -> str:
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


def _need(meta: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in meta:
        raise HandoffError(f"handoff state: field {key!r} missing")
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise HandoffError(f"handoff state: field {key!r} has the wrong type")
    return value


def check_meta(
    meta: dict[str, Any],
    *,
    fingerprint: str,
    exits: tuple[int, ...],
    vocab_size: int,
    max_context: int,
) -> StateMeta:
    """Validate the metadata object against the receiving model's facts."""
    if _need(meta, "version", int) != VERSION:
        raise HandoffError(f"handoff state version {meta['version']} unsupported (want {VERSION})")
    mode = _need(meta, "mode", str)
    if mode not in MODES:
        raise HandoffError(f"handoff state: unknown mode {mode!r}")
    state_fp = _need(meta, "fingerprint", str)
    if mode == "hidden" and state_fp != fingerprint:
        raise ModelMismatch(
            f"hidden-state handoff made for model {state_fp}, this node serves {fingerprint};"
            " only tokens mode can cross models"
        )
    exit_layer = _need(meta, "exit", int)
    if exit_layer not in exits:
        raise HandoffError(
            f"handoff state: exit {exit_layer} is not an exit of this model {list(exits)}"
        )
    token_ids = _need(meta, "token_ids", list)
    if not token_ids or not all(isinstance(t, int) and 0 <= t < vocab_size for t in token_ids):
        raise HandoffError(
            f"handoff state: token ids empty or outside the vocabulary 0..{vocab_size - 1}"
        )
    if len(token_ids) >= max_context:
        raise HandoffError(
            f"handoff state: {len(token_ids)} tokens exceed the context length {max_context}"
        )
    num_prompt = _need(meta, "num_prompt_tokens", int)
    if not 1 <= num_prompt <= len(token_ids):
        raise HandoffError("handoff state: num_prompt_tokens out of range")
    params = SamplingParams.from_dict(_need(meta, "params", dict))
    seed = _need(meta, "seed", int)
    emitted = _need(meta, "num_emitted_chars", int)
    if emitted < 0:
        raise HandoffError("handoff state: num_emitted_chars is negative")
    dtype_name = _need(meta, "dtype", str)
    if dtype_name not in DTYPE_NAMES:
        raise HandoffError(f"handoff state: dtype {dtype_name!r} unsupported")
    return StateMeta(
        mode, state_fp, exit_layer, token_ids, num_prompt, params, seed, emitted, dtype_name
    )


def peek_metadata(data: bytes) -> dict[str, Any]:
    """The metadata object of an encoded state, without loading tensors (not validated)."""
    return _header(data)[1]


def _header(data: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """(safetensors header, ruyiflow metadata) of an encoded state."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(bytes(data[8 : 8 + header_len]))
        meta = json.loads(header["__metadata__"]["ruyiflow"])
    except Exception as exc:
        raise HandoffError(f"handoff state is not a valid payload: {exc}") from exc
    if not isinstance(meta, dict):
        raise HandoffError("handoff state: metadata is not an object")
    return header, meta


def tensor_bytes(data: bytes, name: str) -> bytes | None:
    """Raw bytes of tensor `name` (None when absent), read from the header's offsets."""
    header, _ = _header(data)
    entry = header.get(name)
    if entry is None:
        return None
    base = 8 + int.from_bytes(data[:8], "little")
    try:
        start, end = (int(x) for x in entry["data_offsets"])
    except Exception as exc:
        raise HandoffError(f"handoff state: tensor {name!r} has a bad header") from exc
    if not 0 <= start <= end <= len(data) - base:
        raise HandoffError(f"handoff state: tensor {name!r} lies outside the payload")
    return bytes(data[base + start : base + end])


def encode_arrays(meta: StateMeta, arrays: dict[str, np.ndarray]) -> bytes:
    """Safetensors bytes of numpy `arrays` with `meta` (float arrays must match meta.dtype)."""
    return np_save(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()},
        metadata={"ruyiflow": meta.to_json()},
    )


def to_tokens_mode(data: bytes) -> bytes:
    """Re-encode a state as `tokens` mode (drop tensors but the RNG state)."""
    meta = peek_metadata(data)
    if meta.get("mode") == "tokens":
        return data
    rng = tensor_bytes(data, "rng")
    meta["mode"] = "tokens"
    arrays = {} if rng is None else {"rng": np.frombuffer(rng, dtype=np.uint8)}
    return np_save(arrays, metadata={"ruyiflow": json.dumps(meta)})
