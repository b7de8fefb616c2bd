"""The handoff cost model of DESIGN.md: bytes formula, and which mode wins where."""

from __future__ import annotations

import pytest

from ruyiflow.cluster.errors import InvalidRequest, ModelMismatch
from ruyiflow.router.policy import choose_handoff_mode, hidden_state_bytes

# SmolLM2-135M: hidden 576, 3 KV heads of 64; escalating from exit 16 to exit 20 (21 layers).
SHAPE = dict(hidden_size=576, trunk_layers=16, kv_heads=3, head_dim=64, dtype_bytes=4)


def decide(num_tokens: int, bandwidth: float, rtt_ms: float, prefill: float, **kwargs):
    args = dict(SHAPE, same_model=True, dest_layers=21) | kwargs
    return choose_handoff_mode(
        num_tokens,
        **args,
        bandwidth_bytes_per_s=bandwidth,
        rtt_ms=rtt_ms,
        dest_prefill_tokens_per_s=prefill,
    )


def test_hidden_bytes_formula() -> None:
    per_token = 576 + 2 * 16 * 3 * 64
    assert hidden_state_bytes(100, **SHAPE) == 100 * per_token * 4
    decision = decide(100, 1e9, 1.0, 1000.0)
    assert decision.hidden is not None and decision.hidden.num_bytes == 100 * per_token * 4
    assert decision.tokens.num_bytes == 400


def test_tokens_win_on_slow_link_for_long_context() -> None:
    decision = decide(2048, bandwidth=1e6, rtt_ms=40.0, prefill=5000.0)  # ~8 Mbit/s uplink
    assert decision.mode == "tokens" and not decision.is_forced
    assert decision.hidden is not None and decision.hidden.total_s > decision.tokens.total_s


def test_hidden_wins_on_fast_link_when_prefill_is_slow() -> None:
    decision = decide(2048, bandwidth=10e9 / 8, rtt_ms=0.1, prefill=200.0)
    assert decision.mode == "hidden"
    assert decision.hidden is not None
    # the destination computes only its layers from the boundary: 5 of 21
    assert decision.hidden.compute_s == pytest.approx(decision.tokens.compute_s * 5 / 21)


def test_cost_grows_with_context() -> None:
    short, long = decide(128, 1e8, 1.0, 1000.0), decide(2048, 1e8, 1.0, 1000.0)
    assert long.tokens.total_s > short.tokens.total_s
    assert long.hidden.total_s > short.hidden.total_s


def test_different_model_is_tokens_only() -> None:
    decision = decide(2048, bandwidth=10e9, rtt_ms=0.1, prefill=1.0, same_model=False)
    assert decision.mode == "tokens" and decision.hidden is None
    with pytest.raises(ModelMismatch):
        decide(16, 1e9, 1.0, 100.0, same_model=False, requested="hidden")


def test_requested_mode_wins_and_is_marked() -> None:
    forced = decide(2048, bandwidth=1e6, rtt_ms=40.0, prefill=5000.0, requested="hidden")
    assert forced.mode == "hidden" and forced.is_forced
    assert decide(16, 1e9, 0.1, 1.0, requested="tokens").mode == "tokens"
    with pytest.raises(InvalidRequest):
        decide(16, 1e9, 0.1, 1.0, requested="teleport")
    assert set(forced.as_dict()) == {"mode", "tokens", "hidden", "is_forced"}


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        decide(16, 1e9, 0.1, 0.0)
    with pytest.raises(ValueError):
        decide(16, 1e9, 0.1, 1.0, dest_layers=16)
