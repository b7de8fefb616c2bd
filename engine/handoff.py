"""Handoff state: a running sequence exported to bytes and imported in another process.

Layout: safetensors (a JSON header, then raw little-endian tensor bytes; never pickle). The
header's `__metadata__["ruyiflow"]` is a JSON object with token ids, exit, sampling parameters,
counters and the model fingerprint. Tensors:

- mode `hidden`: `boundary` [T, hidden] (the hidden state entering layer `exit` for the T cached
  positions) and `trunk.{i}.k` / `trunk.{i}.v` [kv_heads, T, head_dim] for trunk layers i < exit;
- both modes: `rng` uint8 [n], the request's generator state (same seed => same continuation);
  optional (an ONNX Runtime node writes none: the importer reseeds from `seed`).

Import checks everything before it touches the engine: parse, version, fingerprint, exit, token
ids, counters, tensor names, dtypes, shapes and finiteness. Any failure raises `HandoffError`
(or `ModelMismatch` for other weights) naming the cause.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ruyiflow.engine.errors import HandoffError
from ruyiflow.engine.handoff_meta import (  # noqa: F401 (re-exported)
    MODES,
    VERSION,
    StateMeta,
    check_meta,
    peek_metadata,
    to_tokens_mode,
)
from ruyiflow.engine.sampling import SamplingParams
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

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
    rng: torch.Tensor | None  # uint8 [RNG_STATE_BYTES]; None: reseed from `seed`
    boundary: torch.Tensor | None  # [T, hidden]
    trunk_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per trunk layer (k, v) [KVH, T, D]

    @property
    def num_cached(self) -> int:
        return len(self.token_ids) - 1


def encode_state(state: HandoffState, dtype: torch.dtype) -> bytes:
    meta = StateMeta(
        state.mode,
        state.fingerprint,
        state.exit,
        state.token_ids,
        state.num_prompt_tokens,
        state.params,
        state.seed,
        state.num_emitted_chars,
        DTYPE_NAMES[dtype],
    )
    tensors = {} if state.rng is None else {"rng": state.rng.contiguous()}
    if state.mode == "hidden":
        tensors["boundary"] = state.boundary.contiguous()
        for i, (k, v) in enumerate(state.trunk_kv):
            tensors[f"trunk.{i}.k"] = k.contiguous()
            tensors[f"trunk.{i}.v"] = v.contiguous()
    return st_save(tensors, metadata={"ruyiflow": meta.to_json()})


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
    m = check_meta(
        meta, fingerprint=fingerprint, exits=exits, vocab_size=vocab_size, max_context=max_context
    )
    dtype = FLOAT_DTYPES[m.dtype]

    t = m.num_cached
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if "rng" in tensors:  # optional: an ONNX Runtime node has no torch generator to save
        expected["rng"] = ((RNG_STATE_BYTES,), torch.uint8)
    if m.mode == "hidden":
        expected["boundary"] = ((t, hidden_size), dtype)
        for i in range(m.exit):
            for kv in "kv":
                expected[f"trunk.{i}.{kv}"] = ((num_kv_heads, t, head_dim), dtype)
    _check_tensors(tensors, expected)
    trunk = (
        [(tensors[f"trunk.{i}.k"], tensors[f"trunk.{i}.v"]) for i in range(m.exit)]
        if m.mode == "hidden"
        else []
    )
    return HandoffState(
        m.mode,
        m.fingerprint,
        m.exit,
        m.token_ids,
        m.num_prompt_tokens,
        m.params,
        m.seed,
        m.num_emitted_chars,
        tensors.get("rng"),
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
