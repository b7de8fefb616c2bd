"""The handoff wire format, written once for every runner: byte-compatible with safetensors (so
peers that parse states with the safetensors library interoperate), strict on every field, and
torch-free."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ruyiflow.engine.errors import HandoffError
from ruyiflow.engine.handoff import (
    HandoffState,
    ModelFacts,
    decode_state,
    encode_state,
    is_finite,
    peek_metadata,
    to_tokens_mode,
)
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.engine.torch_runner import from_raw, to_raw

FACTS = ModelFacts(
    "fp", (1, 3), vocab_size=50, max_context=64, hidden_size=4, num_kv_heads=2, head_dim=3
)


def hidden_state(dtype: torch.dtype = torch.bfloat16, exit_layer: int = 1) -> HandoffState:
    gen = torch.Generator().manual_seed(0)
    tensors = {"boundary": to_raw(torch.randn(4, 4, generator=gen).to(dtype))}
    for i in range(exit_layer):
        for kv in "kv":
            tensors[f"trunk.{i}.{kv}"] = to_raw(torch.randn(2, 4, 3, generator=gen).to(dtype))
    name = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}[dtype]
    return HandoffState(
        "hidden",
        "fp",
        exit_layer,
        [1, 2, 3, 4, 5],
        3,
        SamplingParams(max_tokens=9),
        7,
        2,
        name,
        tensors,
        bytes(range(16)),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_and_safetensors_reads_it(dtype):
    state = hidden_state(dtype, exit_layer=3)
    data = encode_state(state)
    back = decode_state(data, FACTS)
    assert back.token_ids == state.token_ids and back.rng == state.rng and back.dtype == state.dtype
    for name, raw in state.tensors.items():
        assert torch.equal(from_raw(back.tensors[name]), from_raw(raw))
    # the safetensors library parses our bytes, with our metadata
    loaded = st_load(data)
    assert torch.equal(loaded["boundary"], from_raw(state.tensors["boundary"]))
    assert loaded["rng"].dtype == torch.uint8
    assert json.loads(peek_metadata(data)["params"]["max_tokens"].__str__()) == 9


def test_states_written_by_safetensors_decode():
    """An older peer wrote states with safetensors.torch.save: they still decode."""
    state = hidden_state(torch.float32)
    tensors = {name: from_raw(raw) for name, raw in state.tensors.items()}
    tensors["rng"] = torch.arange(16, dtype=torch.uint8)
    data = st_save(tensors, metadata={"ruyiflow": state.meta_json()})
    back = decode_state(data, FACTS)
    assert torch.equal(from_raw(back.tensors["trunk.0.v"]), tensors["trunk.0.v"])
    assert back.rng == bytes(range(16))


def test_tokens_mode_drops_tensors_but_keeps_the_generator():
    data = to_tokens_mode(encode_state(hidden_state()))
    back = decode_state(data, FACTS)
    assert back.mode == "tokens" and not back.tensors and back.rng == bytes(range(16))
    assert to_tokens_mode(data) == data


def test_bfloat16_non_finite_values_are_found():
    t = torch.zeros(8, dtype=torch.bfloat16)
    assert is_finite(to_raw(t))
    for bad in (float("inf"), float("-inf"), float("nan")):
        t[5] = bad
        assert not is_finite(to_raw(t))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d[:-1], "truncated"),
        (lambda d: d + b"\0", "truncated"),
        (lambda d: (10**9).to_bytes(8, "little") + d[8:], "outside the payload"),
        (lambda d: d[:8] + b"[" + d[9:], "not a valid payload"),
    ],
)
def test_framing_errors(edit, match):
    with pytest.raises(HandoffError, match=match):
        decode_state(edit(encode_state(hidden_state())), FACTS)


def test_overlapping_or_misdescribed_tensors_are_refused():
    state = hidden_state(torch.float32)
    data = bytearray(encode_state(state))
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header["boundary"]["shape"] = [4, 5]  # says 80 bytes where 64 are
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (header_len - len(raw))
    with pytest.raises(HandoffError, match="boundary"):
        decode_state(bytes(data[:8]) + raw + bytes(data[8 + header_len :]), FACTS)
