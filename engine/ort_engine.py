"""The ONNX Runtime model runner: exported branches behind the `ModelRunner` interface, without
PyTorch (an edge node on `backend: onnxruntime`).

The node opens one export per served exit (`ruyiflow export-onnx`, `engine.onnx`). A step's
single-token rows run, per exit, as one batched call (rows padded to the longest past and
masked); each prefill chunk runs as its own call. The per-sequence cache keeps the KV of every
layer the branch runs and the boundary hidden states, so a `hidden` handoff state has exactly the
torch runner's layout (float32): a torch cloud node resumes it at a deeper exit. Moving to
another exit on this node re-prefills there (the exports share no trunk cache); imported states
of either mode are re-prefilled from their tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ruyiflow.engine.batch import Work
from ruyiflow.engine.engine import Engine
from ruyiflow.engine.errors import InvalidRequest, ModelLoadError, ModelMismatch
from ruyiflow.engine.events import Confidence
from ruyiflow.engine.handoff import HandoffState, RawTensor
from ruyiflow.engine.runner import ModelRunner, pick_tokens
from ruyiflow.engine.sampling_np import draw, exit_confidence, make_generator, process_row
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


class OrtRunner(ModelRunner):
    """The runner over ONNX Runtime branches (`branches`: exit -> OnnxBranch)."""

    state_dtype = "F32"  # exports run in float32

    def __init__(self, branches: dict[int, Any], tokenizer: Any):
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

    @classmethod
    def open(
        cls,
        root: str | Path,
        exits: tuple[int, ...] | list[int],
        providers: tuple[str, ...] | list[str] = (),
        expect_model: str | None = None,
        threads: int | None = None,
    ) -> OrtRunner:
        """Open `root/exit-<E>` for each exit (checked against its manifest: files, exit, and the
        model source it was exported from when `expect_model` is given) and the tokenizer
        stored with the exports."""
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
            branch = OnnxBranch.open(
                path, providers=list(providers) or None, threads=threads, expect_exit=exit_layer
            )
            if expect_model is not None and branch.manifest.model_name != expect_model:
                raise ModelMismatch(
                    f"{path}: exported from model {branch.manifest.model_name!r}, but this node "
                    f"serves {expect_model!r}; re-export it (or let `ruyiflow up` do it)"
                )
            branches[exit_layer] = branch
        return cls(branches, Tokenizer.from_dir(root / f"exit-{exits[0]}"))

    def new_cache(self) -> OrtCache:
        c = self.config
        # Sized for the deepest served branch; a sequence uses the first exit+1 layers.
        return OrtCache(max(c.served) + 1, c.num_kv_heads, c.head_dim, c.hidden_size)

    def new_generator(self, seed: int | None) -> tuple[np.random.Generator, int]:
        return make_generator(seed)

    # -- compute --------------------------------------------------------------------------------
    def run(self, works: list[Work]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = [None] * len(works)
        rows_by_exit: dict[int, list[int]] = {}
        for i, w in enumerate(works):
            if len(w.token_ids) == 1 and w.start > 0:  # decode rows: batched per exit
                rows_by_exit.setdefault(w.exit, []).append(i)
            else:
                logits = self._prefill(w)
                out[i] = logits if w.want_logits else None
        for exit_layer, index in rows_by_exit.items():
            logits = self._decode(exit_layer, [works[i] for i in index])
            for row, i in enumerate(index):
                out[i] = logits[row] if works[i].want_logits else None
        return out

    def _decode(self, exit_layer: int, works: list[Work]) -> np.ndarray:
        """One token for each work item (all at `exit_layer`) in one call -> logits [B, V]."""
        c, n_layers = self.config, exit_layer + 1
        lengths = [w.start for w in works]
        b, p = len(works), max(lengths)
        shape = (b, c.num_kv_heads, p, c.head_dim)
        past = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(n_layers)]
        mask = np.zeros((b, p + 1), np.int64)
        for row, w in enumerate(works):
            t = lengths[row]
            for i in range(n_layers):
                k, v = w.cache.kv[i]
                past[i][0][row, :, :t] = k[:, :t]
                past[i][1][row, :, :t] = v[:, :t]
            mask[row, :t] = 1
        mask[:, p] = 1  # the new token sits after the padding of shorter rows
        ids = np.array([w.token_ids for w in works], np.int64)
        positions = np.array([[t] for t in lengths], np.int64)
        logits, boundary, present = self.branches[exit_layer].run(ids, positions, mask, past)
        for row, w in enumerate(works):
            w.cache.write(row, present, slice(p, p + 1), boundary[row])
        return logits

    def _prefill(self, w: Work) -> np.ndarray:
        """Feed a chunk after the cached positions -> logits [V] of its last token."""
        cache, n_layers, t = w.cache, w.exit + 1, w.start
        past = [(k[None, :, :t], v[None, :, :t]) for k, v in cache.kv[:n_layers]]
        ids = np.array([w.token_ids], np.int64)
        positions = np.arange(t, t + len(w.token_ids), dtype=np.int64)[None]
        mask = np.ones((1, t + len(w.token_ids)), np.int64)
        logits, boundary, present = self.branches[w.exit].run(ids, positions, mask, past)
        cache.write(0, present, slice(t, t + len(w.token_ids)), boundary[0])
        return logits[0]

    def sample(self, rows: list[tuple[Sequence, np.ndarray]]) -> list[tuple[int, Confidence]]:
        stacked = np.stack([lg for _, lg in rows]).astype(np.float32)  # [B, V]
        greedy = np.argmax(stacked, axis=-1).tolist()
        return pick_tokens(rows, greedy, exit_confidence(stacked), process_row, draw)

    # -- moving ---------------------------------------------------------------------------------
    def switch_exit(self, cache: OrtCache, from_exit: int, to_exit: int) -> bool:
        return False  # another export shares no cache with this one: re-prefill there

    def state_tensors(self, cache: OrtCache, exit_layer: int) -> dict[str, RawTensor]:
        t = cache.length
        tensors = {"boundary": _raw(cache.boundary[:t])}
        for i in range(exit_layer):  # trunk layers; the branch layer's KV stays behind
            k, v = cache.kv[i]
            tensors[f"trunk.{i}.k"], tensors[f"trunk.{i}.v"] = _raw(k[:, :t]), _raw(v[:, :t])
        return tensors

    def restore_cache(self, cache: OrtCache, state: HandoffState, to_exit: int) -> bool:
        return False  # states resume from their tokens here

    def rng_state(self, generator: np.random.Generator) -> None:
        return None  # numpy's generator cannot travel to a torch node: the importer reseeds

    def restore_generator(
        self, generator: np.random.Generator, rng: bytes | None, seed: int
    ) -> np.random.Generator:
        return make_generator(seed)[0]


def _raw(array: np.ndarray) -> RawTensor:
    return RawTensor("F32", tuple(array.shape), np.ascontiguousarray(array, "<f4").tobytes())


def open_export(
    path: str | Path,
    providers: list[str] | tuple[str, ...] = (),
    max_batch: int = 8,
    threads: int | None = None,
) -> Engine:
    """An engine over one export directory (the exit its manifest names); `threads`: ONNX
    Runtime intra-op threads (default: its own choice)."""
    from ruyiflow.engine.onnx.runtime import OnnxBranch
    from ruyiflow.engine.tokenizer import Tokenizer

    branch = OnnxBranch.open(Path(path), providers=list(providers) or None, threads=threads)
    runner = OrtRunner({branch.exit: branch}, Tokenizer.from_dir(path))
    return Engine(runner, max_batch=max_batch)


def open_ort_engine(
    root: str | Path,
    exits: tuple[int, ...] | list[int],
    providers: tuple[str, ...] | list[str] = (),
    max_batch: int = 8,
    max_context: int | None = None,
    expect_model: str | None = None,
) -> Engine:
    """An engine over the exports `root/exit-<E>` of the served exits (`OrtRunner.open`)."""
    runner = OrtRunner.open(root, exits, providers, expect_model)
    return Engine(runner, max_batch=max_batch, max_context=max_context)
