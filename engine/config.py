"""Model configuration: one frozen dataclass for every dense family, read from a Hugging Face
`config.json` (old `rope_theta`/`rope_scaling` fields or transformers-5 `rope_parameters`) or built
from GGUF metadata.

A plain dense model is a family with one exit (its last layer); `extra_exits` turns it into a
family the Ruyi way (branch layer = copy of `layers[e]`, branch norm = final norm, shared head).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ruyiflow.engine.errors import ModelLoadError

DENSE_FAMILIES = ("llama", "qwen2", "qwen3", "ruyi_qwen2", "ruyi_qwen3")
RUYI_FAMILIES = ("ruyi_qwen2", "ruyi_qwen3")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 scaling only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"unsupported rope type {self.rope_type!r} (have {ROPE_TYPES})")
        if self.theta <= 0 or self.factor <= 0:
            raise ModelLoadError("rope theta and factor must be positive")


@dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    exits: tuple[int, ...]  # ascending; the last is always num_layers - 1
    default_exit: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    shared_heads: bool = False  # one lm_head for every exit
    native_branches: bool = False  # checkpoint has eelayers/norms (Ruyi); else copied
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.family not in DENSE_FAMILIES:
            raise ModelLoadError(f"unknown family {self.family!r} (known: {DENSE_FAMILIES})")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ModelLoadError(f"config field {name} must be positive")
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError("num_attention_heads must be a multiple of num_key_value_heads")
        if list(self.exits) != sorted(set(self.exits)) or not self.exits:
            raise ModelLoadError(f"exits must be ascending and unique, got {list(self.exits)}")
        if self.exits[-1] != self.num_layers - 1:
            raise ModelLoadError(
                f"the last exit must be the last layer {self.num_layers - 1}, got {self.exits[-1]}"
            )
        if self.exits[0] < 1:
            raise ModelLoadError(f"exit {self.exits[0]} leaves no trunk layer; exits start at 1")
        if self.default_exit not in self.exits:
            raise ModelLoadError(f"default exit {self.default_exit} not in exits {self.exits}")

    @property
    def last_exit(self) -> int:
        return self.exits[-1]

    def check_exit(self, exit_layer: int) -> None:
        from ruyiflow.engine.errors import InvalidRequest

        if exit_layer not in self.exits:
            raise InvalidRequest(
                f"exit {exit_layer} is not an exit of this model {list(self.exits)}"
            )

    def with_extra_exits(self, extra: list[int] | tuple[int, ...]) -> ModelConfig:
        """A plain model served as a family: add exits below the last layer."""
        if self.native_branches:
            raise ModelLoadError(
                "extra exits apply to plain models; Ruyi checkpoints have their own"
            )
        bad = [e for e in extra if not 1 <= e < self.num_layers - 1]
        if bad:
            raise ModelLoadError(f"extra exits {bad} out of range 1..{self.num_layers - 2}")
        exits = tuple(sorted(set(extra) | {self.num_layers - 1}))
        return replace(self, exits=exits, shared_heads=True)

    def to_dict(self) -> dict[str, Any]:
        """Canonical dict (used by the fingerprint and `ruyiflow models`)."""
        from dataclasses import asdict

        return asdict(self)


def _rope_from_hf(d: dict[str, Any]) -> RopeConfig:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    return RopeConfig(
        theta=float(theta),
        rope_type=str(rope_type),
        factor=float(merged.get("factor", 1.0) or 1.0),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def config_from_hf(d: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from a parsed Hugging Face config.json."""
    family = d.get("model_type")
    if family not in DENSE_FAMILIES:
        raise ModelLoadError(f"unknown family (model_type) {family!r}; known: {DENSE_FAMILIES}")
    if d.get("use_sliding_window"):
        raise ModelLoadError("sliding-window attention (use_sliding_window: true) is not supported")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"hidden_act {act!r} unsupported (only silu)")
    try:
        num_layers = int(d["num_hidden_layers"])
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = int(d.get("head_dim") or hidden // num_heads)
        is_ruyi = family in RUYI_FAMILIES
        exits = (num_layers - 1,)
        default_exit = num_layers - 1
        if is_ruyi:
            exits = tuple(int(e) for e in d.get("early_exit_points", [num_layers - 1]))
            default_exit = int(d.get("default_early_exit_point", exits[-1]))
            if default_exit not in exits:  # upstream rule: -1 or unknown means the last exit
                default_exit = exits[-1]
        base = family.removeprefix("ruyi_")
        return ModelConfig(
            family=family,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(d),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            exits=exits,
            default_exit=default_exit,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if base == "qwen2" else bool(d.get("attention_bias", False)),
            qk_norm=base == "qwen3",
            shared_heads=bool(d.get("shared_heads", False)) if is_ruyi else True,
            native_branches=is_ruyi,
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_ids(d.get("eos_token_id")),
        )
    except KeyError as exc:
        raise ModelLoadError(f"config.json is missing required field {exc.args[0]!r}") from exc


def load_hf_config(path: Path) -> dict[str, Any]:
    file = path / "config.json"
    if not file.is_file():
        raise ModelLoadError(f"{file}: config.json not found")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{file}: not valid JSON ({exc})") from exc
