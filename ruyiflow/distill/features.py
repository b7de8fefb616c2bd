"""What training needs from the frozen model, computed once and cached in the out dir: per exit
the boundary hidden states of every corpus token (the trunk is frozen, so they never change),
and the teacher's (last exit's) distribution at every loss position as its top-k log-probs
plus one tail bucket holding the rest of the mass (vocabularies are large: 49152 for SmolLM2).

A sample of n tokens feeds its first n - 1 to the model (the last is only predicted), so it has
n - 1 rows; its loss rows are those predicting answer tokens, num_prompt - 1 .. n - 2. The
engine's cache already holds these boundary states once a generation finishes, so the corpus
build collects them as it goes (`FeatureBuilder`); `compute_features` recomputes them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ruyiflow.distill.branch import BranchWeights, branch_forward
from ruyiflow.distill.corpus import Sample
from ruyiflow.engine.kv_cache import SequenceCache
from ruyiflow.engine.model import FamilyModel, Work
from ruyiflow.progress import progress_bar

FEATURES_VERSION = 1
GROUP_TOKENS = 2048  # trunk rows per forward call
FEATURES_FILE = "features.safetensors"


@dataclass
class Features:
    lengths: list[int]  # rows per sample (tokens fed); rows of `boundary` are end to end
    num_answer: list[int]  # loss rows per sample: the last rows, one per answer token
    boundary: dict[int, torch.Tensor]  # exit -> [rows, hidden] float32
    teacher_ids: torch.Tensor  # [loss_rows, k] int64, top-k token ids
    teacher_logp: torch.Tensor  # [loss_rows, k + 1] float32; last column = log(tail mass)
    targets: torch.Tensor  # [loss_rows] the answer token each loss row predicts

    @property
    def loss_starts(self) -> list[int]:
        return [t - a for t, a in zip(self.lengths, self.num_answer, strict=True)]

    def row_offsets(self) -> list[int]:
        return _offsets(self.lengths)

    def loss_offsets(self) -> list[int]:
        return _offsets(self.num_answer)


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


def sample_groups(samples: list[Sample], max_rows: int = GROUP_TOKENS) -> Iterator[list[int]]:
    group, rows = [], 0
    for i, s in enumerate(samples):
        if group and rows + len(s.ids) > max_rows:
            yield group
            group, rows = [], 0
        group.append(i)
        rows += len(s.ids)
    if group:
        yield group


def boundary_states(model: FamilyModel, samples: list[Sample]) -> list[dict[int, torch.Tensor]]:
    """For each sample, h entering layer e at every fed position, {exit: [n - 1, hidden]}.
    Runs the serving forward at the last exit, which keeps every exit's boundary in the cache."""
    caches = [model.new_cache() for _ in samples]
    works = [
        Work(c, s.ids[:-1], 0, model.config.last_exit, want_logits=False)
        for c, s in zip(caches, samples, strict=True)
    ]
    model.forward(works)
    return [
        cache_states(c, model.config.exits, len(s.ids) - 1)
        for c, s in zip(caches, samples, strict=True)
    ]


def cache_states(
    cache: SequenceCache, exits: tuple[int, ...], rows: int
) -> dict[int, torch.Tensor]:
    """Float32 copies of a cache's boundary states, cloned outside inference mode (the copies
    may enter autograd graphs)."""
    return {e: cache.boundary[e][:rows].float().clone() for e in exits}


def loss_rows(lengths: list[int], starts: list[int]) -> torch.Tensor:
    """Rows (samples of `lengths` rows end to end) from each sample's start to its end."""
    rows, offset = [], 0
    for t, s in zip(lengths, starts, strict=True):
        rows.append(torch.arange(offset + s, offset + t))
        offset += t
    return torch.cat(rows)


def answer_rows(samples: list[Sample]) -> torch.Tensor:
    """Rows (fed positions of `samples` end to end) that predict answer tokens."""
    return loss_rows([len(s.ids) - 1 for s in samples], [s.num_prompt - 1 for s in samples])


def exit_logits(
    model: FamilyModel, exit_layer: int, h: torch.Tensor, lengths: list[int], rows: torch.Tensor
) -> torch.Tensor:
    """Logits [len(rows), vocab] float32 of the model's own branch at `exit_layer`."""
    with torch.no_grad():
        normed = branch_forward(
            BranchWeights(model.branches[exit_layer]), h, lengths, model.geo, model.rope
        )
        return normed[rows] @ model.branches[exit_layer].head.float().T


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] -> (ids [N, k], logp [N, k + 1]) with the tail bucket's log mass last."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top, ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return ids, torch.cat([top, tail], dim=-1)


class FeatureBuilder:
    """Collects features sample by sample (in any order) and assembles them in sample order."""

    def __init__(self, model: FamilyModel, exits: tuple[int, ...], top_k: int):
        self.model, self.exits, self.top_k = model, tuple(exits), top_k
        self.parts: dict[int, tuple] = {}

    def add_states(self, index: int, samples: list[Sample], states: list[dict]) -> None:
        """Features of `samples` (indices index, index + 1, ...) from their boundary states."""
        last = self.model.config.last_exit
        lengths = [len(s.ids) - 1 for s in samples]
        h_last = torch.cat([st[last] for st in states])
        logits = exit_logits(self.model, last, h_last, lengths, answer_rows(samples))
        ids, logp = teacher_topk(logits, self.top_k)
        row = 0
        for k, (s, st) in enumerate(zip(samples, states, strict=True)):
            n = len(s.ids) - s.num_prompt
            self.parts[index + k] = (
                len(s.ids) - 1,
                n,
                {e: st[e] for e in self.exits},
                ids[row : row + n],
                logp[row : row + n],
                torch.tensor(s.ids[s.num_prompt :], dtype=torch.long),
            )
            row += n

    def add_cache(self, index: int, sample: Sample, cache: SequenceCache) -> None:
        """Features of one finished generation from its engine cache (no recompute)."""
        if cache.length != len(sample.ids) - 1:
            raise ValueError("cache does not hold exactly the fed positions of the sample")
        states = cache_states(cache, self.model.config.exits, cache.length)
        self.add_states(index, [sample], [states])

    def build(self, num_samples: int) -> Features:
        parts = [self.parts[i] for i in range(num_samples)]
        return Features(
            lengths=[p[0] for p in parts],
            num_answer=[p[1] for p in parts],
            boundary={e: torch.cat([p[2][e] for p in parts]) for e in self.exits},
            teacher_ids=torch.cat([p[3] for p in parts]),
            teacher_logp=torch.cat([p[4] for p in parts]),
            targets=torch.cat([p[5] for p in parts]),
        )


def compute_features(
    model: FamilyModel, samples: list[Sample], exits: tuple[int, ...], top_k: int, quiet: bool
) -> Features:
    """Recompute features of a cached corpus with the trunk (when exits or top-k changed)."""
    builder = FeatureBuilder(model, exits, top_k)
    total = sum(len(s.ids) for s in samples)
    done = 0
    with progress_bar(total, "features", "tok", disable=quiet) as bar:
        for group in sample_groups(samples):
            chunk = [samples[i] for i in group]
            builder.add_states(group[0], chunk, boundary_states(model, chunk))
            done += sum(len(s.ids) for s in chunk)
            bar.advance_to(done)
    return builder.build(len(samples))


def features_key(corpus_key: str, exits: tuple[int, ...], top_k: int) -> str:
    text = json.dumps([FEATURES_VERSION, corpus_key, list(exits), top_k])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def save_features(features: Features, out_dir: Path, key: str) -> None:
    from safetensors.torch import save_file

    file = Path(out_dir) / FEATURES_FILE
    tensors = {f"boundary.{e}": t for e, t in features.boundary.items()}
    tensors.update(
        teacher_ids=features.teacher_ids,
        teacher_logp=features.teacher_logp,
        targets=features.targets,
    )
    meta = {
        "key": key,
        "lengths": json.dumps(features.lengths),
        "num_answer": json.dumps(features.num_answer),
    }
    tmp = file.with_name(file.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    tmp.replace(file)


def read_features(out_dir: Path, key: str, exits: tuple[int, ...]) -> Features | None:
    """The cached features when their key matches, else None (a half-written or foreign cache
    is recomputed, never trusted)."""
    from safetensors import safe_open

    file = Path(out_dir) / FEATURES_FILE
    if not file.is_file():
        return None
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            return Features(
                lengths=json.loads(meta["lengths"]),
                num_answer=json.loads(meta["num_answer"]),
                boundary={e: f.get_tensor(f"boundary.{e}") for e in exits},
                teacher_ids=f.get_tensor("teacher_ids"),
                teacher_logp=f.get_tensor("teacher_logp"),
                targets=f.get_tensor("targets"),
            )
    except Exception:
        return None
