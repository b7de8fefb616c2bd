"""What the confidence gate sees of each prompt at each shallow exit, before anything streams:
the first token's confidence (max_prob, margin, entropy) and the prompt's pooled boundary
states (last and mean, the trunk probe's input). `ruyiflow eval exits --features FILE` writes it
beside the results: one prefill per prompt and exit with the first token held (no generation),
so it is cheap to add to an existing results file.

File: numpy .npz with `ids` [N], `exits` [E], `token` [N, E] int64, `max_prob` / `margin` /
`entropy` [N, E] float32, `pooled` [N, E, 2 * hidden] float32 and `meta` (JSON: fingerprint).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ruyiflow.engine.errors import InvalidRequest, ModelMismatch
from ruyiflow.evaluation.prompts import Prompt
from ruyiflow.evaluation.results import PromptResult
from ruyiflow.progress import progress_bar

MEASURE_FIELDS = ("max_prob", "margin", "entropy")


@dataclass(frozen=True)
class FirstTokens:
    """The gate's inputs for N prompts at E exits (module docstring)."""

    ids: tuple[str, ...]
    exits: tuple[int, ...]
    token: np.ndarray  # [N, E] the greedy first token
    max_prob: np.ndarray  # [N, E]
    margin: np.ndarray  # [N, E]
    entropy: np.ndarray  # [N, E] nats
    pooled: np.ndarray  # [N, E, 2 * hidden] last and mean boundary state of the prompt
    fingerprint: str

    def __post_init__(self) -> None:
        n, e = len(self.ids), len(self.exits)
        for name in ("token", *MEASURE_FIELDS):
            if getattr(self, name).shape != (n, e):
                raise InvalidRequest(f"first-token table: {name} is not [{n}, {e}]")
        if self.pooled.ndim != 3 or self.pooled.shape[:2] != (n, e):
            raise InvalidRequest(f"first-token table: pooled is not [{n}, {e}, D]")

    def row(self, prompt_id: str) -> int:
        try:
            return self.ids.index(prompt_id)
        except ValueError:
            raise InvalidRequest(f"no first-token features for prompt {prompt_id!r}") from None

    def column(self, exit_layer: int) -> int:
        if exit_layer not in self.exits:
            raise InvalidRequest(f"no first-token features at exit {exit_layer}")
        return self.exits.index(exit_layer)

    def measure(self, name: str, prompt_id: str, exit_layer: int) -> float:
        return float(getattr(self, name)[self.row(prompt_id), self.column(exit_layer)])

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:  # a file object: numpy adds no `.npz` to the name
            np.savez_compressed(
                f,
                ids=np.array(self.ids),
                exits=np.array(self.exits, dtype=np.int64),
                token=self.token,
                max_prob=self.max_prob,
                margin=self.margin,
                entropy=self.entropy,
                pooled=self.pooled,
                meta=np.array(json.dumps({"fingerprint": self.fingerprint})),
            )


def load_first_tokens(path: str | Path, fingerprint: str | None = None) -> FirstTokens:
    """A table written by `FirstTokens.save`; ModelMismatch when made with other weights."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            table = FirstTokens(
                tuple(str(i) for i in data["ids"]),
                tuple(int(e) for e in data["exits"]),
                data["token"].astype(np.int64),
                *(data[name].astype(np.float32) for name in MEASURE_FIELDS),
                data["pooled"].astype(np.float32),
                str(meta["fingerprint"]),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidRequest(f"{path}: not a first-token features file ({exc})") from None
    if fingerprint is not None and table.fingerprint != fingerprint:
        raise ModelMismatch(f"{path} was made with model {table.fingerprint}, not {fingerprint}")
    return table


def first_tokens(
    engine, prompt_ids: Sequence[tuple[str, list[int]]], exits: Sequence[int]
) -> FirstTokens:
    """Prefill every (prompt, exit), hold its first token, read the gate's inputs, drop it.
    `prompt_ids`: (prompt id, templated token ids); up to `engine.max_batch` share a step."""
    from ruyiflow.engine.sampling import SamplingParams

    exits = tuple(exits)
    n, e = len(prompt_ids), len(exits)
    token = np.zeros((n, e), np.int64)
    measures = {name: np.zeros((n, e), np.float32) for name in MEASURE_FIELDS}
    pooled: np.ndarray | None = None
    pending = deque((i, j) for i in range(n) for j in range(e))
    active: dict[str, tuple[int, int]] = {}
    params = SamplingParams(max_tokens=1)
    with progress_bar(n * e, "first tokens", "prefill") as bar:
        while pending or active:
            while pending and len(active) < engine.max_batch:
                i, j = pending.popleft()
                seq_id = engine.add_request(prompt_ids[i][1], params, exits[j], hold_first=True)
                active[seq_id] = (i, j)
            engine.step()  # prefill only: every first token is held, none is emitted
            for seq_id, held in list(engine.held.items()):
                i, j = active.pop(seq_id)
                features = engine.prompt_features(seq_id)  # [2 * hidden]
                if pooled is None:
                    pooled = np.zeros((n, e, features.shape[0]), np.float32)
                pooled[i, j] = features
                token[i, j] = held.token_id
                c = held.confidence
                measures["max_prob"][i, j] = c.max_prob
                measures["margin"][i, j] = c.margin
                measures["entropy"][i, j] = c.entropy
                engine.abort(seq_id)
                bar.advance()
    if pooled is None:
        raise InvalidRequest("no prompts to read first tokens of")
    ids = tuple(pid for pid, _ in prompt_ids)
    return FirstTokens(ids, exits, token, *measures.values(), pooled, engine.fingerprint)


def prompts_first_tokens(engine, prompts: Sequence[Prompt]) -> FirstTokens:
    """`first_tokens` of prompts (chat template) at every exit but the deepest."""
    from ruyiflow.evaluation.runner import prompt_ids

    exits = engine.config.exits[:-1]
    return first_tokens(engine, [(p.id, prompt_ids(engine, p)) for p in prompts], exits)


@dataclass(frozen=True)
class GateData:
    """Per prompt and shallow exit: the gate's measures and the exit's disagreement with the
    deepest exit (1 - agreement of its greedy output), what calibration and evaluation read."""

    ids: tuple[str, ...]
    exits: tuple[int, ...]  # every exit of the model, ascending; the last is the deepest
    loss: np.ndarray  # [N, E-1]
    measures: Mapping[str, np.ndarray]  # name -> [N, E-1] raw values (entropy in nats)
    prompt_len: np.ndarray  # [N] prompt tokens (chat template applied)
    deep_len: np.ndarray  # [N] tokens the deepest exit generated

    @property
    def shallow(self) -> tuple[int, ...]:
        return self.exits[:-1]

    def subset(self, keep: Sequence[bool]) -> GateData:
        mask = np.asarray(keep, bool)
        ids = tuple(i for i, k in zip(self.ids, mask, strict=True) if k)
        measures = {k: v[mask] for k, v in self.measures.items()}
        return GateData(
            ids, self.exits, self.loss[mask], measures, self.prompt_len[mask], self.deep_len[mask]
        )


def gate_data(
    results: Sequence[PromptResult], table: FirstTokens, probes: Mapping[int, object] | None = None
) -> GateData:
    """GateData of `results` (in their order) from their first-token table; `probes` (exit ->
    `node.probe.Probe`) add a `probe` measure when every shallow exit has one."""
    from ruyiflow.node.probe import probe_input

    probes = probes or {}
    exits = tuple(results[0].exits)
    shallow = exits[:-1]
    rows = [table.row(r.id) for r in results]
    cols = [table.column(e) for e in shallow]
    loss = np.array([[1.0 - r.exits[e].agreement for e in shallow] for r in results])
    measures = {name: getattr(table, name)[np.ix_(rows, cols)] for name in MEASURE_FIELDS}
    if probes and all(e in probes for e in shallow):
        scores = np.zeros((len(results), len(shallow)))
        for j, (e, c) in enumerate(zip(shallow, cols, strict=True)):
            x = np.stack(
                [
                    probe_input(
                        table.pooled[i, c],
                        table.max_prob[i, c],
                        table.margin[i, c],
                        table.entropy[i, c],
                    )
                    for i in rows
                ]
            )
            scores[:, j] = probes[e].predict(x)
        measures["probe"] = scores
    prompt_len = np.array([r.num_prompt_tokens or 0 for r in results], np.float64)
    deep_len = np.array([len(r.exits[r.deepest].token_ids) for r in results], np.float64)
    return GateData(tuple(r.id for r in results), exits, loss, measures, prompt_len, deep_len)
