"""`OnnxBranch`: run an exported branch with ONNX Runtime and numpy arrays; no torch.

    branch = OnnxBranch.open(export_dir, expect_fingerprint=fp, expect_exit=12)
    past = branch.empty_past(batch=1)
    logits, boundary, past = branch.run(ids, positions, mask, past)    # prefill, then
    logits, boundary, past = branch.run(next_ids, next_pos, mask, past)  # decode steps

One graph serves prefill and decode. `past` / `present` are lists of `num_kv_layers` (key, value)
pairs, float32 [batch, kv_heads, len, head_dim]: entries 0..exit-1 are trunk layers 0..exit-1 (the
torch SequenceCache's `trunk[i]`), the last is the branch layer (`branch[exit]`). Keys are stored
after RoPE. Rows of a batch may be padded anywhere (attention_mask 0): each row's logits are those
of its last new position, so pad the new tokens of a prefill batch on the left.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ruyiflow.engine.errors import InvalidRequest, ModelLoadError, RuyiflowError
from ruyiflow.engine.onnx.manifest import Manifest, check_files, check_identity, read_manifest

KV = tuple[np.ndarray, np.ndarray]


class OnnxBranch:
    """One exported branch in one ONNX Runtime session (thread-safe `run`, as ORT's)."""

    def __init__(self, path: Path, manifest: Manifest, session: ort.InferenceSession):
        self.path = path
        self.manifest = manifest
        self.session = session
        n = manifest.facts.num_kv_layers
        self._outputs = ["logits", "boundary"] + [
            f"present.{i}.{kind}" for i in range(n) for kind in ("key", "value")
        ]

    @classmethod
    def open(
        cls,
        path: str | Path,
        providers: Sequence[Any] | None = None,
        threads: int | None = None,
        expect_fingerprint: str | None = None,
        expect_exit: int | None = None,
    ) -> OnnxBranch:
        """Validate the export (manifest, file sizes and sha256, identity) and start a session.

        Raises ModelLoadError for a missing, stale or corrupt export and ModelMismatch when it
        was exported from another model (fingerprint) or exit than expected. `threads`: ORT
        intra-op threads (default: ORT's choice, one per physical core)."""
        root = Path(path)
        if not root.is_dir():
            raise ModelLoadError(f"{root}: no such export directory")
        manifest = read_manifest(root)
        check_identity(manifest, expect_fingerprint, expect_exit)
        check_files(root, manifest)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.inter_op_num_threads = 1
        if threads is not None:
            if threads < 1:
                raise InvalidRequest(f"threads must be >= 1, got {threads}")
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(
                str(root / manifest.graph_file),
                sess_options=options,
                providers=list(providers or ["CPUExecutionProvider"]),
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"{root}: ONNX Runtime cannot load the export ({exc})") from exc
        return cls(root, manifest, session)

    # -- facts --------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def exit(self) -> int:
        return self.manifest.exit

    @property
    def exits(self) -> tuple[int, ...]:
        return self.manifest.exits

    @property
    def family(self) -> str:
        return self.manifest.facts.family

    @property
    def quant(self) -> str | None:
        return self.manifest.quant

    @property
    def hidden_size(self) -> int:
        return self.manifest.facts.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.manifest.facts.vocab_size

    @property
    def num_kv_heads(self) -> int:
        return self.manifest.facts.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.manifest.facts.head_dim

    @property
    def num_kv_layers(self) -> int:
        """Trunk layers 0..exit-1 plus the branch layer."""
        return self.manifest.facts.num_kv_layers

    @property
    def max_context(self) -> int:
        """Positions must stay below this (rows of the RoPE table)."""
        return self.manifest.facts.max_context

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.manifest.facts.eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self.manifest.facts.bos_token_id

    def load_tokenizer(self):
        """The export's tokenizer (engine.tokenizer.Tokenizer; torch-free)."""
        from ruyiflow.engine.tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path)

    # -- running ------------------------------------------------------------------------------
    def empty_past(self, batch: int) -> list[KV]:
        """A KV cache of length 0 for `batch` rows (what a prefill starts from)."""
        if batch < 1:
            raise InvalidRequest(f"batch must be >= 1, got {batch}")
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [
            (np.zeros(shape, np.float32), np.zeros(shape, np.float32))
            for _ in range(self.num_kv_layers)
        ]

    def run(
        self,
        input_ids: np.ndarray,
        position_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: Sequence[KV],
    ) -> tuple[np.ndarray, np.ndarray, list[KV]]:
        """input_ids / position_ids int [B, S]; attention_mask int [B, P+S] (1 attend, 0 pad);
        past: num_kv_layers (key, value) float32 [B, kv_heads, P, head_dim].

        Returns logits float32 [B, vocab] (last new position of each row), boundary float32
        [B, S, hidden] (entering the branch layer) and present [B, kv_heads, P+S, head_dim]."""
        ids = _int64(input_ids, "input_ids")
        positions = _int64(position_ids, "position_ids")
        mask = _int64(attention_mask, "attention_mask")
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise InvalidRequest(f"input_ids must be [batch, new_len] >= 1, got {ids.shape}")
        batch, new_len = ids.shape
        if positions.shape != ids.shape:
            raise InvalidRequest(f"position_ids {positions.shape} != input_ids {ids.shape}")
        if len(past) != self.num_kv_layers:
            raise InvalidRequest(
                f"past has {len(past)} layers; this branch runs {self.num_kv_layers}"
            )
        feeds: dict[str, np.ndarray] = {}
        past_len = -1  # set by the first 4-D array; all must agree
        for i, pair in enumerate(past):
            if len(pair) != 2:
                raise InvalidRequest(f"past[{i}] must be a (key, value) pair")
            for kind, array in zip(("key", "value"), pair, strict=True):
                array = np.ascontiguousarray(array, dtype=np.float32)
                if past_len < 0 and array.ndim == 4:
                    past_len = array.shape[2]
                if array.shape != (batch, self.num_kv_heads, past_len, self.head_dim):
                    raise InvalidRequest(
                        f"past[{i}] {kind} has shape {array.shape}; expected [{batch},"
                        f" {self.num_kv_heads}, past_len, {self.head_dim}] with one past_len"
                    )
                feeds[f"past.{i}.{kind}"] = array
        if mask.shape != (batch, past_len + new_len):
            raise InvalidRequest(
                f"attention_mask has shape {mask.shape}; expected [{batch}, {past_len + new_len}]"
                " (past + new positions)"
            )
        _check_range(ids, self.vocab_size, "input_ids", "vocabulary size")
        _check_range(positions, self.max_context, "position_ids", "exported max_context")
        _check_range(mask, 2, "attention_mask", "2 (values are 0 or 1)")
        feeds.update(input_ids=ids, position_ids=positions, attention_mask=mask)
        try:
            out = self.session.run(self._outputs, feeds)
        except Exception as exc:  # ORT's own exception types
            raise RuyiflowError(f"ONNX Runtime failed running exit {self.exit}: {exc}") from exc
        present = [(out[2 + 2 * i], out[3 + 2 * i]) for i in range(self.num_kv_layers)]
        return out[0], out[1], present


def _int64(array: Any, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "iu":
        raise InvalidRequest(f"{name} must hold integers, got dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _check_range(array: np.ndarray, limit: int, name: str, what: str) -> None:
    if array.size and (array.min() < 0 or array.max() >= limit):
        raise InvalidRequest(
            f"{name} values must be in 0..{limit - 1} ({what}); got {array.min()}..{array.max()}"
        )
