"""Memory an MoE model needs, estimated from its config before a single weight is read, and the
refusal when it does not fit.

    weights   = parameters (every expert) x dtype size, routers and correction biases in float32
    KV cache  = max_batch x max_context x `kv_values_per_token` x dtype size
    workspace = activations of one step: a prefill chunk's hidden states, the routed experts'
                intermediates and the logits (a generous fixed bound, see `workspace_bytes`)

Available memory is `/proc/meminfo` MemAvailable, or `RUYIFLOW_MEMORY_AVAILABLE` (bytes, or with a
K/M/G/T suffix) when set, or the caller's `available_bytes`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ruyiflow.engine.errors import ModelLoadError
from ruyiflow.engine.moe.config import MoEConfig

ENV_AVAILABLE = "RUYIFLOW_MEMORY_AVAILABLE"
DEFAULT_CONTEXT = 4096  # when the caller names none (capped by max_position_embeddings)
STEP_TOKENS = 2048  # the Engine's default max_step_tokens
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


@dataclass(frozen=True)
class MemoryEstimate:
    weight_bytes: int
    kv_bytes: int
    workspace_bytes: int
    max_context: int
    max_batch: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.workspace_bytes

    def describe(self) -> str:
        return (
            f"{_gib(self.total_bytes)} (weights {_gib(self.weight_bytes)} + KV cache "
            f"{_gib(self.kv_bytes)} for {self.max_batch} x {self.max_context} tokens + "
            f"workspace {_gib(self.workspace_bytes)})"
        )


def workspace_bytes(config: MoEConfig, elem: int, max_batch: int) -> int:
    """One step's transient tensors, bounded generously: a chunk of STEP_TOKENS rows through a
    layer (hidden states x 8, top-k expert intermediates x 3, attention scores of one head
    group) plus float32 logits for the batch."""
    c = config
    rows = STEP_TOKENS
    width = max(
        c.intermediate_size,
        c.moe_intermediate_size * (c.num_experts_per_tok + 2),
        c.shared_intermediate_size,
    )
    per_row = 8 * c.hidden_size + 3 * width + c.num_heads * 64
    return rows * per_row * elem + max_batch * c.vocab_size * 4


def estimate_memory(
    config: MoEConfig,
    dtype: torch.dtype,
    max_context: int | None = None,
    max_batch: int | None = None,
) -> MemoryEstimate:
    """Bytes to serve `config` in `dtype` with `max_batch` sequences of `max_context` tokens."""
    c = config
    context = max_context or min(DEFAULT_CONTEXT, c.max_position_embeddings)
    batch = max_batch or 1
    if context < 1 or batch < 1:
        raise ModelLoadError(f"max_context {context} and max_batch {batch} must be >= 1")
    elem = torch.tensor([], dtype=dtype).element_size()
    routers = sum(
        c.num_experts * (c.hidden_size + 1) for i in range(c.num_layers) if c.is_moe_layer(i)
    )
    weights = (c.num_parameters() - routers) * elem + routers * 4
    kv = batch * context * c.kv_values_per_token() * elem
    return MemoryEstimate(weights, kv, workspace_bytes(c, elem, batch), context, batch)


def parse_bytes(text: str) -> int:
    """'123', '64G', '1.5T', '512MiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ModelLoadError(f"{ENV_AVAILABLE}={text!r}: expected bytes such as 64G or 1000000")
    return int(float(match[1]) * _UNITS[match[2].upper()])


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, str]:
    """(bytes available, where the figure comes from)."""
    override = os.environ.get(ENV_AVAILABLE)
    if override:
        return parse_bytes(override), ENV_AVAILABLE
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    raise ModelLoadError(
        f"cannot tell available memory: no MemAvailable in {meminfo}; set {ENV_AVAILABLE}"
    )


def check_memory(estimate: MemoryEstimate, available_bytes: int | None = None) -> None:
    """Raise ModelLoadError naming needed vs available bytes when the estimate does not fit."""
    if available_bytes is None:
        available_bytes, source = available_memory()
    else:
        source = "given by the caller"
    if estimate.total_bytes > available_bytes:
        raise ModelLoadError(
            f"not enough memory to load this model: needs {estimate.describe()}, but only "
            f"{_gib(available_bytes)} is available ({source}); lower max_context "
            f"({estimate.max_context}) or max_batch ({estimate.max_batch}), pick a smaller dtype, "
            "or use a machine with more memory"
        )
