"""MoE model configuration: frozen dataclasses for Hunyuan-A13B (`hunyuan_v1_moe`), dots.llm1
(`dots1`) and DeepSeek-V3 style models with MLA (`deepseek_v3`, JoyAI-LLM Flash).

`MoEConfig` carries the attribute names the engine reads from a dense `ModelConfig` (`family`,
`vocab_size`, `hidden_size`, `num_layers`, `num_kv_heads`, `head_dim`, `exits`, `default_exit`,
`last_exit`, `check_exit`, `max_position_embeddings`, `eos_token_ids`, ...), so the
Engine, the node and the fingerprint take either. An MoE model has one exit: its last layer.
For MLA, `num_kv_heads`/`head_dim` describe the cache as absorbed MLA sees it: one shared "head"
of `kv_lora_rank + qk_rope_head_dim` values (latent + rope key) per layer and token.
Parsing `config.json` lives in `engine.moe.hf_config`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ruyiflow.engine.attention import QK_NORMS  # noqa: F401 (re-exported)
from ruyiflow.engine.errors import InvalidRequest, ModelLoadError

FAMILIES = ("hunyuan_v1_moe", "dots1", "deepseek_v3")

SCORINGS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "linear", "ntk_alpha", "yarn")
LATENT_NORM_EPS = 1e-6  # MLA's q_a/kv_a RMSNorms use the class default, not rms_norm_eps


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or value <= 0:
            raise ModelLoadError(f"config field {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class MoERope:
    """RoPE over `dim` dims. `ntk_alpha` is Hunyuan's static base stretch
    (theta * alpha^(dim/(dim-2))); `yarn` follows transformers' `_compute_yarn_parameters`."""

    theta: float
    dim: int
    rope_type: str = "default"
    factor: float = 1.0
    alpha: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0 = absent
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # cos/sin scaling; None = derived (yarn)
    truncate: bool = True
    interleaved: bool = False  # DeepSeek pairs (2i, 2i+1); weights are permuted at load

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ModelLoadError(f"unsupported rope type {self.rope_type!r} (have {ROPE_TYPES})")
        if self.theta <= 0 or self.factor <= 0 or self.alpha <= 0:
            raise ModelLoadError("rope theta, factor and alpha must be positive")
        if self.dim <= 2 or self.dim % 2:
            raise ModelLoadError(f"rope dimension {self.dim} must be even and > 2")


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek-V3 multi-head latent attention dimensions."""

    q_lora_rank: int | None  # None: plain q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        _positive(self, "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if self.q_lora_rank is not None:
            _positive(self, "q_lora_rank")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per layer and token: compressed KV + the shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class MoEConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense FFN of layers < first_k_dense
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: MoERope
    max_position_embeddings: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int  # one routed expert's width
    shared_intermediate_size: int  # total width of the shared expert(s); 0 = none
    first_k_dense: int = 0  # layers [0, k) are dense
    scoring: str = "softmax"
    has_correction_bias: bool = False  # e_score_correction_bias (selection only)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0  # routed experts only, never the shared one
    num_groups: int = 1
    topk_groups: int = 1
    qk_norm: str = "none"
    mla: MLAConfig | None = None
    tie_word_embeddings: bool = False
    num_mtp_layers: int = 0  # DeepSeek next-token-prediction layers (keys skipped)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    exits: tuple[int, ...] = ()  # () = (num_layers - 1,)
    default_exit: int = -1  # -1 = the last layer

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelLoadError(f"unknown MoE family {self.family!r} (known: {FAMILIES})")
        _positive(
            self,
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "num_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
        )
        last = self.num_layers - 1
        if not self.exits:
            object.__setattr__(self, "exits", (last,))
        if self.default_exit == -1:
            object.__setattr__(self, "default_exit", last)
        if self.exits != (last,) or self.default_exit != last:
            raise ModelLoadError(
                f"an MoE model has one exit, its last layer {last}; "
                f"got exits {list(self.exits)} default {self.default_exit}"
            )
        if self.scoring not in SCORINGS:
            raise ModelLoadError(f"router scoring {self.scoring!r} unsupported (have {SCORINGS})")
        if self.qk_norm not in QK_NORMS:
            raise ModelLoadError(f"qk_norm {self.qk_norm!r} unknown (have {QK_NORMS})")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ModelLoadError(
                f"first_k_dense_replace {self.first_k_dense} not in 0..{self.num_layers}"
            )
        if self.first_k_dense and self.intermediate_size <= 0:
            raise ModelLoadError("dense layers need a positive intermediate_size")
        if self.shared_intermediate_size < 0:
            raise ModelLoadError("shared expert width must be >= 0")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ModelLoadError(
                f"{self.num_experts} experts do not split into n_group {self.num_groups} groups"
            )
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ModelLoadError(f"topk_group {self.topk_groups} not in 1..{self.num_groups}")
        selectable = self.topk_groups * (self.num_experts // self.num_groups)
        if self.num_experts_per_tok > selectable:
            raise ModelLoadError(
                f"num_experts_per_tok {self.num_experts_per_tok} exceeds the "
                f"{selectable} experts selectable ({self.num_experts} experts, "
                f"{self.topk_groups} of {self.num_groups} groups)"
            )
        if self.routed_scaling_factor <= 0:
            raise ModelLoadError("routed_scaling_factor must be positive")
        if self.mla is None and self.num_heads % self.num_kv_heads:
            raise ModelLoadError("num_attention_heads must be a multiple of num_key_value_heads")
        if (self.family == "deepseek_v3") != (self.mla is not None):
            raise ModelLoadError("MLA attention is the deepseek_v3 family's, and only its")

    # -- the engine's exit interface -----------------------------------------------------------
    @property
    def last_exit(self) -> int:
        return self.exits[-1]

    def check_exit(self, exit_layer: int) -> None:
        if exit_layer not in self.exits:
            raise InvalidRequest(
                f"exit {exit_layer} is not an exit of this model "
                f"{list(self.exits)} (an MoE model has only its last layer)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Canonical dict (fingerprint, `ruyiflow models`)."""
        return asdict(self)

    # -- facts ---------------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense

    def kv_values_per_token(self) -> int:
        """Cached values per token over all layers (latent + rope key for MLA, K and V else)."""
        if self.mla is not None:
            return self.num_layers * self.mla.latent_dim
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def attention_parameters(self) -> int:
        h, n = self.hidden_size, self.num_heads
        if self.mla is None:
            qk_norm = 0 if self.qk_norm == "none" else 2 * self.head_dim
            return h * (n + 2 * self.num_kv_heads) * self.head_dim + n * self.head_dim * h + qk_norm
        m = self.mla
        if m.q_lora_rank is None:
            q = h * n * m.qk_head_dim
        else:
            q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * m.qk_head_dim
        kv = (
            h * m.latent_dim
            + m.kv_lora_rank
            + m.kv_lora_rank * n * (m.qk_nope_head_dim + m.v_head_dim)
        )
        return q + kv + n * m.v_head_dim * h

    def num_parameters(self, active: bool = False) -> int:
        """Total parameters, or those one token touches (`active`: top-k routed experts and the
        shared ones, not every expert). Embedding and head count in full either way."""
        h = self.hidden_size
        count = self.vocab_size * h * (1 if self.tie_word_embeddings else 2) + h
        expert = 3 * h * self.moe_intermediate_size
        for i in range(self.num_layers):
            count += 2 * h + self.attention_parameters()
            if not self.is_moe_layer(i):
                count += 3 * h * self.intermediate_size
                continue
            count += self.num_experts * h + (self.num_experts if self.has_correction_bias else 0)
            count += expert * (self.num_experts_per_tok if active else self.num_experts)
            count += 3 * h * self.shared_intermediate_size
        return count
