"""Handoff state: a running sequence exported to bytes and imported in another process.

Layout: safetensors (a JSON header, then raw little-endian tensor bytes; never pickle). The
header's `__metadata__["ruyiflow"]` is a JSON object with token ids, exit, sampling parameters,
counters and the model fingerprint. Tensors:

- mode `hidden`: `boundary` [T, hidden] (the hidden state entering layer `exit` for the T cached
  positions) and `trunk.{i}.k` / `trunk.{i}.v` [kv_heads, T, head_dim] for trunk layers i < exit;
- both modes: `rng` uint8 [n], the request's generator state (same seed => same continuation).

Import checks everything before it touches the engine: parse, version, fingerprint, exit, token
ids, counters, tensor names, dtypes, shapes and finiteness. Any failure raises `HandoffError`
(or `ModelMismatch` for other weights) naming the cause.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from engine.errors import HandoffError, ModelMismatch
from engine.sampling import SamplingParams

VERSION = 1
MODES = ("hidden", "tokens")
FLOAT_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
RNG_STATE_BYTES = torch.Generator().get_state().numel()


@dataclass
class HandoffState:
    """Validated contents of a handoff state."""

    mode: str
    fingerprint: str
    exit: int
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    seed: int
    num_emitted_chars: int
    rng: torch.Tensor  # uint8 [RNG_STATE_BYTES]
    boundary: torch.Tensor | None  # [T, hidden]
    trunk_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per trunk layer (k, v) [KVH, T, D]

    @property
    def num_cached(self) -> int:
        return len(self.token_ids) - 1


def encode_state(state: HandoffState, dtype: torch.dtype) -> bytes:
    meta = {
        "version": VERSION,
        "mode": state.mode,
        "fingerprint": state.fingerprint,
        "exit": state.exit,
        "token_ids": state.token_ids,
        "num_prompt_tokens": state.num_prompt_tokens,
        "params": state.params.to_dict(),
        "seed": state.seed,
        "num_emitted_chars": state.num_emitted_chars,
        "dtype": DTYPE_NAMES[dtype],
    }
    tensors = {"rng": state.rng.contiguous()}
    if state.mode == "hidden":
        tensors["boundary"] = state.boundary.contiguous()
        for i, (k, v) in enumerate(state.trunk_kv):
            tensors[f"trunk.{i}.k"] = k.contiguous()
            tensors[f"trunk.{i}.v"] = v.contiguous()
    return st_save(tensors, metadata={"ruyiflow": json.dumps(meta)})


def _need(meta: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in meta:
        raise HandoffError(f"handoff state: field {key!r} missing")
    value = meta[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise HandoffError(f"handoff state: field {key!r} has the wrong type")
    return value


def decode_state(
    data: bytes,
    *,
    fingerprint: str,
    exits: tuple[int, ...],
    vocab_size: int,
    max_context: int,
    hidden_size: int,
    num_kv_heads: int,
    head_dim: int,
) -> HandoffState:
    """Parse and validate a state against the receiving model's facts."""
    # safetensors.load drops metadata; peek_metadata reads the length-prefixed JSON header.
    meta = peek_metadata(data)
    try:
        tensors = st_load(bytes(data))
    except Exception as exc:  # any parse failure is a bad payload
        raise HandoffError(f"handoff state is not a valid payload: {exc}") from exc
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
    if dtype_name not in FLOAT_DTYPES:
        raise HandoffError(f"handoff state: dtype {dtype_name!r} unsupported")
    dtype = FLOAT_DTYPES[dtype_name]

    t = len(token_ids) - 1
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "rng": ((RNG_STATE_BYTES,), torch.uint8)
    }
    if mode == "hidden":
        expected["boundary"] = ((t, hidden_size), dtype)
        for i in range(exit_layer):
            for kv in "kv":
                expected[f"trunk.{i}.{kv}"] = ((num_kv_heads, t, head_dim), dtype)
    _check_tensors(tensors, expected)
    trunk = (
        [(tensors[f"trunk.{i}.k"], tensors[f"trunk.{i}.v"]) for i in range(exit_layer)]
        if mode == "hidden"
        else []
    )
    return HandoffState(
        mode,
        state_fp,
        exit_layer,
        token_ids,
        num_prompt,
        params,
        seed,
        emitted,
        tensors["rng"],
        tensors.get("boundary"),
        trunk,
    )


def _check_tensors(
    tensors: dict[str, torch.Tensor], expected: dict[str, tuple[tuple[int, ...], torch.dtype]]
) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise HandoffError(f"handoff state: tensors missing {missing[:4]} / unexpected {extra[:4]}")
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if t.dtype != dtype:
            raise HandoffError(
                f"handoff state: tensor {name!r} has dtype {t.dtype}, expected {dtype}"
            )
        if tuple(t.shape) != shape:
            raise HandoffError(
                f"handoff state: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HandoffError(f"handoff state: tensor {name!r} has non-finite values")


def peek_metadata(data: bytes) -> dict[str, Any]:
    """The metadata object of an encoded state, without loading tensors (not validated)."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(bytes(data[8 : 8 + header_len]))["__metadata__"]["ruyiflow"])
    except Exception as exc:
        raise HandoffError(f"handoff state is not a valid payload: {exc}") from exc
    if not isinstance(meta, dict):
        raise HandoffError("handoff state: metadata is not an object")
    return meta


def to_tokens_mode(data: bytes) -> bytes:
    """Re-encode a state as `tokens` mode (drop tensors but the RNG state)."""
    meta = peek_metadata(data)
    if meta.get("mode") == "tokens":
        return data
    try:
        rng = st_load(bytes(data))["rng"]
    except Exception as exc:
        raise HandoffError(f"handoff state is not a valid payload: {exc}") from exc
    meta["mode"] = "tokens"
    return st_save({"rng": rng}, metadata={"ruyiflow": json.dumps(meta)})
