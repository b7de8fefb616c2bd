"""Model runners: what owns a model's tensors and device, behind one small interface, registered
by name (`torch`, `onnxruntime`). The `Engine` drives any of them the same way: the scheduler
decides what runs, `run` computes it, `sample` turns logits into tokens, and handoff states go
through `state_tensors` / `restore_cache` in the one wire format of `engine.handoff`.

A runner is torch-free to import here; each implementation imports its own stack, so an ONNX
Runtime edge node never loads PyTorch.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from ruyiflow.engine.batch import Work
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.events import Confidence
from ruyiflow.engine.handoff import HandoffState, RawTensor
from ruyiflow.engine.sequence import Sequence

# name -> "module:factory" (imported only when that runner is opened)
RUNNERS = {
    "torch": "ruyiflow.engine.torch_runner:TorchRunner.open",
    "onnxruntime": "ruyiflow.engine.ort_engine:OrtRunner.open",
}


class ModelRunner(ABC):
    """One model's compute. Attributes every runner sets:

    - `config`: the model facts the engine reads (exits, default_exit, check_exit(e),
      vocab_size, max_position_embeddings, eos_token_ids, hidden_size, num_kv_heads, head_dim,
      num_layers);
    - `tokenizer`, `fingerprint`;
    - `state_dtype`: dtype name of exported hidden states and KV ("F32", "BF16", "F16").
    """

    config: Any
    tokenizer: Any
    fingerprint: str
    state_dtype: str

    @abstractmethod
    def new_cache(self) -> Any:
        """An empty per-sequence cache (its `length` is the number of cached positions)."""

    @abstractmethod
    def new_generator(self, seed: int | None) -> tuple[Any, int]:
        """A private random generator and the seed it was given (drawn when None)."""

    @abstractmethod
    def run(self, works: list[Work]) -> list[Any]:
        """Compute every work item (updating its cache); float32 logits [vocab] of each item's
        last token, or None where `want_logits` is False, in the order given."""

    @abstractmethod
    def sample(self, rows: list[tuple[Sequence, Any]]) -> list[tuple[int, Confidence]]:
        """(token, confidence of the branch's own distribution) for each (sequence, logits)."""

    @abstractmethod
    def switch_exit(self, cache: Any, from_exit: int, to_exit: int) -> bool:
        """Make `cache` valid at `to_exit` without recomputing what is valid; False when this
        runner cannot (the engine then re-prefills the sequence at the new exit)."""

    @abstractmethod
    def state_tensors(self, cache: Any, exit_layer: int) -> dict[str, RawTensor]:
        """`boundary` and `trunk.{i}.k/v` of the cached positions (the handoff layout)."""

    @abstractmethod
    def restore_cache(self, cache: Any, state: HandoffState, to_exit: int) -> bool:
        """Fill `cache` from a validated hidden state and make it valid at `to_exit`; False when
        this runner cannot use hidden states (the engine then prefills from the tokens)."""

    @abstractmethod
    def rng_state(self, generator: Any) -> bytes | None:
        """The generator's state for a handoff (None when it cannot travel)."""

    @abstractmethod
    def restore_generator(self, generator: Any, rng: bytes | None, seed: int) -> Any:
        """The generator to continue with: `generator` set to `rng`, or reseeded with `seed`."""

    @property
    def state_dtype_bytes(self) -> int:
        return 4 if self.state_dtype == "F32" else 2

    def check_exit(self, exit_layer: int) -> None:
        self.config.check_exit(exit_layer)


def pick_tokens(
    rows: list[tuple[Sequence, Any]],
    greedy: list[int],
    confidence: tuple[Any, Any, Any],
    process_row: Callable[..., Any],
    draw: Callable[..., int],
) -> list[tuple[int, Confidence]]:
    """Each row's token: its greedy argmax, or a draw from its processed logits when the request
    needs processors; with the branch's own (max_prob, margin, entropy), each [B]. `process_row`
    and `draw` are the runner's array library's (torch or numpy), with the same semantics."""
    max_prob, margin, entropy = confidence
    picks = []
    for k, (seq, row) in enumerate(rows):
        token = greedy[k]
        if seq.params.needs_row_processing:
            processed = process_row(row, seq.params, seq.token_ids, seq.ngrams)
            token = draw(processed, seq.params, seq.generator)
        picks.append((token, Confidence(float(max_prob[k]), float(margin[k]), float(entropy[k]))))
    return picks


def open_runner(name: str, *args: Any, **kwargs: Any) -> ModelRunner:
    """Build the runner registered as `name` (heavy imports happen here, not before)."""
    if name not in RUNNERS:
        raise InvalidRequest(f"unknown runner {name!r}; choose from {', '.join(RUNNERS)}")
    module_name, _, attr = RUNNERS[name].partition(":")
    factory: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        factory = getattr(factory, part)
    return factory(*args, **kwargs)
