"""The ONNX Runtime engine: continuous batching over exported branches, without PyTorch.

An edge node on `backend: onnxruntime` opens one export per served exit (`ruyiflow export-onnx`,
`engine.onnx`). Each step runs, per exit, one batched decode call for every running sequence at
that exit (rows padded to the longest past and masked) and one prefill call per waiting
sequence. The per-sequence cache keeps the KV of every layer the branch runs and the boundary
hidden states, so a `hidden` handoff state has exactly the torch engine's layout (float32): a
torch cloud node resumes it at a deeper exit. Moving to another exit on this node re-prefills at
that exit (the exports share no trunk cache); imported states of either mode are re-prefilled
from their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ruyiflow.engine.errors import HandoffError, InvalidRequest, ModelLoadError, ModelMismatch
from ruyiflow.engine.events import Confidence, Status, TokenEvent
from ruyiflow.engine.handoff_meta import StateMeta, check_meta, encode_arrays, peek_metadata
from ruyiflow.engine.sampling_np import draw, exit_confidence, make_generator, process_row
from ruyiflow.engine.scheduler import Scheduler
from ruyiflow.engine.sequence import Sequence

GROW_MULTIPLE = 64


@dataclass(frozen=True)
class OrtConfig:
    """The model facts the serving layer reads, from the exports' manifests."""

    family: str
    exits: tuple[int, ...]  # every exit of the model (escalation targets may be elsewhere)
    served: tuple[int, ...]  # exits with an export here
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]

    @property
    def default_exit(self) -> int:
        return self.served[-1]

    def check_exit(self, exit_layer: int) -> None:
        if exit_layer not in self.served:
            raise InvalidRequest(
                f"exit {exit_layer} is not served by this onnxruntime node (exports for exits "
                f"{list(self.served)})"
            )


class OrtCache:
    """One sequence's KV for the layers its branch runs, plus boundary hidden states."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, hidden_size: int):
        self.shape = (num_kv_heads, 0, head_dim)
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.length = 0
        self.kv = [(self._empty(0), self._empty(0)) for _ in range(num_layers)]  # [KVH, cap, D]
        self.boundary = np.zeros((0, hidden_size), np.float32)  # [cap, hidden]

    def _empty(self, capacity: int) -> np.ndarray:
        return np.zeros((self.shape[0], capacity, self.shape[2]), np.float32)

    @property
    def capacity(self) -> int:
        return self.boundary.shape[0]

    def reserve(self, length: int) -> None:
        if length <= self.capacity:
            return
        cap = max(length, 2 * self.capacity)
        cap = -(-cap // GROW_MULTIPLE) * GROW_MULTIPLE
        t = self.length
        for i, (k, v) in enumerate(self.kv):
            k2, v2 = self._empty(cap), self._empty(cap)
            k2[:, :t], v2[:, :t] = k[:, :t], v[:, :t]
            self.kv[i] = (k2, v2)
        b2 = np.zeros((cap, self.hidden_size), np.float32)
        b2[:t] = self.boundary[:t]
        self.boundary = b2

    def write(self, row: int, present: list, src: slice, boundary: np.ndarray) -> None:
        """Append positions `src` of batch row `row` of the present KV ((k, v) per layer, each
        [B, KVH, P+S, D]) and boundary [S', hidden] at the end of this cache."""
        n = boundary.shape[0]
        self.reserve(self.length + n)
        t = self.length
        for i, (pk, pv) in enumerate(present):  # the layers this sequence's branch runs
            k, v = self.kv[i]
            k[:, t : t + n] = pk[row, :, src]
            v[:, t : t + n] = pv[row, :, src]
        self.boundary[t : t + n] = boundary
        self.length += n


class OrtEngine(Scheduler):
    """`Engine`'s interface over ONNX Runtime branches (`branches`: exit -> OnnxBranch)."""

    def __init__(
        self,
        branches: dict[int, Any],
        tokenizer: Any,
        max_batch: int = 8,
        max_context: int | None = None,
        max_step_tokens: int = 2048,
        max_waiting: int = 256,
    ):
        if not branches:
            raise ModelLoadError("an onnxruntime engine needs at least one export")
        self.branches = dict(sorted(branches.items()))
        first = next(iter(self.branches.values()))
        fingerprints = {b.fingerprint for b in self.branches.values()}
        if len(fingerprints) > 1:
            raise ModelMismatch(f"exports of different models in one node: {sorted(fingerprints)}")
        self.fingerprint = first.fingerprint
        self.config = OrtConfig(
            family=first.family,
            exits=tuple(first.exits),
            served=tuple(self.branches),
            num_layers=max(first.exits) + 1,  # the last exit is the last layer
            hidden_size=first.hidden_size,
            num_kv_heads=first.num_kv_heads,
            head_dim=first.head_dim,
            vocab_size=first.vocab_size,
            max_position_embeddings=min(b.max_context for b in self.branches.values()),
            eos_token_ids=tuple(first.eos_token_ids),
        )
        self.tokenizer = tokenizer
        self._init_queues(max_batch, max_context, max_step_tokens, max_waiting)

    # -- Scheduler hooks ------------------------------------------------------------------------
    def _new_cache(self) -> OrtCache:
        c = self.config
        # Sized for the deepest served branch; a sequence uses the first exit+1 layers.
        return OrtCache(max(c.served) + 1, c.num_kv_heads, c.head_dim, c.hidden_size)

    def _new_generator(self, seed: int | None) -> tuple[np.random.Generator, int]:
        return make_generator(seed)

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        rows: list[tuple[Sequence, np.ndarray]] = []
        by_exit: dict[int, list[Sequence]] = {}
        for seq in self.running:
            by_exit.setdefault(seq.exit, []).append(seq)
        for exit_layer, seqs in by_exit.items():
            logits = self._decode(exit_layer, seqs)
            rows += list(zip(seqs, logits, strict=True))
        budget = self.max_step_tokens - len(self.running)
        for seq in list(self.waiting):
            if budget <= 0 or len(rows) >= self.max_batch:
                break
            pending = seq.pending_tokens()
            chunk = pending[:budget]
            logits = self._prefill(seq, chunk)
            budget -= len(chunk)
            if len(chunk) == len(pending):
                rows.append((seq, logits))
        return self._postprocess(rows)

    def _decode(self, exit_layer: int, seqs: list[Sequence]) -> np.ndarray:
        """One token for each of `seqs` (all at `exit_layer`) in one call -> logits [B, V]."""
        c, n_layers = self.config, exit_layer + 1
        lengths = [s.cache.length for s in seqs]
        b, p = len(seqs), max(lengths)
        shape = (b, c.num_kv_heads, p, c.head_dim)
        past = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(n_layers)]
        mask = np.zeros((b, p + 1), np.int64)
        for row, seq in enumerate(seqs):
            t = lengths[row]
            for i in range(n_layers):
                k, v = seq.cache.kv[i]
                past[i][0][row, :, :t] = k[:, :t]
                past[i][1][row, :, :t] = v[:, :t]
            mask[row, :t] = 1
        mask[:, p] = 1  # the new token sits after the padding of shorter rows
        ids = np.array([[s.token_ids[-1]] for s in seqs], np.int64)
        positions = np.array([[t] for t in lengths], np.int64)
        logits, boundary, present = self.branches[exit_layer].run(ids, positions, mask, past)
        for row, seq in enumerate(seqs):
            seq.cache.write(row, present, slice(p, p + 1), boundary[row])
        return logits

    def _prefill(self, seq: Sequence, chunk: list[int]) -> np.ndarray:
        """Feed `chunk` after the sequence's cached positions -> logits [V] of its last token."""
        cache, n_layers, t = seq.cache, seq.exit + 1, seq.cache.length
        past = [(k[None, :, :t], v[None, :, :t]) for k, v in cache.kv[:n_layers]]
        ids = np.array([chunk], np.int64)
        positions = np.arange(t, t + len(chunk), dtype=np.int64)[None]
        mask = np.ones((1, t + len(chunk)), np.int64)
        logits, boundary, present = self.branches[seq.exit].run(ids, positions, mask, past)
        cache.write(0, present, slice(t, t + len(chunk)), boundary[0])
        return logits[0]

    def _postprocess(self, rows: list[tuple[Sequence, np.ndarray]]) -> list[TokenEvent]:
        if not rows:
            return []
        stacked = np.stack([lg for _, lg in rows]).astype(np.float32)  # [B, V]
        max_prob, margin, entropy = exit_confidence(stacked)
        events = []
        for k, (seq, row) in enumerate(rows):
            if seq.params.needs_row_processing:
                processed = process_row(row, seq.params, seq.token_ids, seq.ngrams)
                token = draw(processed, seq.params, seq.generator)
            else:
                token = int(np.argmax(row))
            conf = Confidence(float(max_prob[k]), float(margin[k]), float(entropy[k]))
            events.append(self._emit(seq, token, conf))
        return events

    # -- moving between exits -------------------------------------------------------------------
    def switch_exit(self, seq_id: str, exit_layer: int) -> None:
        """Continue at another served exit: its export shares no cache, so re-prefill there."""
        seq = self._get(seq_id)
        self.config.check_exit(exit_layer)
        seq.exit = exit_layer
        seq.cache = self._new_cache()
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)

    # -- handoff --------------------------------------------------------------------------------
    def export_state(self, seq_id: str, mode: str = "hidden", release: bool = True) -> bytes:
        """Serialise a running sequence in the torch engine's layout (float32, no RNG state)."""
        seq = self._exportable(seq_id, mode)
        meta = StateMeta(
            mode,
            self.fingerprint,
            seq.exit,
            list(seq.token_ids),
            seq.num_prompt_tokens,
            seq.params,
            seq.seed,
            seq.num_emitted_chars,
            "F32",
        )
        arrays: dict[str, np.ndarray] = {}
        if mode == "hidden":
            t = seq.cache.length
            arrays["boundary"] = seq.cache.boundary[:t]
            for i in range(seq.exit):  # trunk layers; the branch layer's KV stays behind
                k, v = seq.cache.kv[i]
                arrays[f"trunk.{i}.k"], arrays[f"trunk.{i}.v"] = k[:, :t], v[:, :t]
        data = encode_arrays(meta, arrays)
        if release:
            self._release(seq)
        return data

    def import_state(
        self, data: bytes, exit_layer: int | None = None, seq_id: str | None = None
    ) -> str:
        """Resume a state here from its tokens (either mode; tensors are not used)."""
        c = self.config
        meta = check_meta(
            peek_metadata(data),
            fingerprint=self.fingerprint,
            exits=c.exits,
            vocab_size=c.vocab_size,
            max_context=self.max_context,
        )
        target = meta.exit if exit_layer is None else exit_layer
        if target not in c.served:
            raise HandoffError(f"exit {target} is not served here (exits {list(c.served)})")
        seq = self._new_sequence(
            seq_id, meta.token_ids, meta.num_prompt_tokens, target, meta.params
        )
        seq.generator, seq.seed = make_generator(meta.seed)
        self._prime_text(seq, meta.num_emitted_chars)
        self._admit(seq)
        return seq.id

    # -- facts for the serving layer ------------------------------------------------------------
    state_dtype_bytes = 4  # exports run in float32

    def _prefill_once(self, exit_layer: int, ids: list[int]) -> None:
        branch, n = self.branches[exit_layer], len(ids)
        positions = np.arange(n, dtype=np.int64)[None]
        branch.run(
            np.array([ids], np.int64), positions, np.ones((1, n), np.int64), branch.empty_past(1)
        )


def open_export(
    path: str | Path,
    providers: list[str] | tuple[str, ...] = (),
    max_batch: int = 8,
    threads: int | None = None,
) -> OrtEngine:
    """An engine over one export directory (the exit its manifest names); `threads`: ONNX
    Runtime intra-op threads (default: its own choice)."""
    from ruyiflow.engine.onnx.runtime import OnnxBranch
    from ruyiflow.engine.tokenizer import Tokenizer

    branch = OnnxBranch.open(Path(path), providers=list(providers) or None, threads=threads)
    return OrtEngine({branch.exit: branch}, Tokenizer.from_dir(path), max_batch=max_batch)


def open_ort_engine(
    root: str | Path,
    exits: tuple[int, ...] | list[int],
    providers: tuple[str, ...] | list[str] = (),
    max_batch: int = 8,
    max_context: int | None = None,
    expect_model: str | None = None,
) -> OrtEngine:
    """Open `root/exit-<E>` for each exit (checked against its manifest: files, exit, and the
    model source it was exported from when `expect_model` is given) and the tokenizer stored
    with the exports."""
    from ruyiflow.engine.onnx.runtime import OnnxBranch
    from ruyiflow.engine.tokenizer import Tokenizer

    root = Path(root)
    branches = {}
    for exit_layer in exits:
        path = root / f"exit-{exit_layer}"
        if not path.is_dir():
            raise ModelLoadError(
                f"{path}: no ONNX export for exit {exit_layer}; create it with `ruyiflow "
                f"export-onnx --exit {exit_layer} --out {path}` (or let `ruyiflow up` do it)"
            )
        branch = OnnxBranch.open(path, providers=list(providers) or None, expect_exit=exit_layer)
        if expect_model is not None and branch.manifest.model_name != expect_model:
            raise ModelMismatch(
                f"{path}: exported from model {branch.manifest.model_name!r}, but this node "
                f"serves {expect_model!r}; re-export it (or let `ruyiflow up` do it)"
            )
        branches[exit_layer] = branch
    tokenizer = Tokenizer.from_dir(root / f"exit-{exits[0]}")
    return OrtEngine(branches, tokenizer, max_batch=max_batch, max_context=max_context)
