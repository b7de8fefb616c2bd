"""Distillation corpus without network: the model's own generations at its last exit for the
shipped seed prompts (chat template applied), batched through the engine and cached on disk.

Prompts are split deterministically: every `HELD_OUT_EVERY`-th one is held out for quality
reports and never trained on. Training samples are one greedy answer per prompt, then sampled
answers (temperature, per-sample seeds) in further rounds until the token budget is reached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ruyiflow.engine.checkpoint import LoadedModel
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.kv_cache import SequenceCache
from ruyiflow.engine.sampling import SamplingParams
from ruyiflow.progress import Bar, progress_bar

SEED_PROMPTS = Path(__file__).with_name("seed_prompts.txt")
HELD_OUT_EVERY = 6  # prompts 5, 11, 17, ... are held out
MAX_ROUNDS = 16  # a model that stops at once must not loop forever on the budget
CORPUS_VERSION = 1
CORPUS_FILE = "corpus.json"


@dataclass(frozen=True)
class Sample:
    ids: list[int]  # prompt + completion
    num_prompt: int


@dataclass(frozen=True)
class CorpusSettings:
    tokens: int = 40000  # completion tokens for training
    max_new_tokens: int = 128
    temperature: float = 0.8  # sampled rounds after the greedy one
    seed: int = 0
    max_batch: int = 16

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.max_new_tokens < 1 or self.max_batch < 1:
            raise InvalidRequest("corpus tokens, max_new_tokens and max_batch must be >= 1")


@dataclass
class Corpus:
    train: list[Sample]
    held_out: list[Sample]

    def num_completion_tokens(self) -> int:
        return sum(len(s.ids) - s.num_prompt for s in self.train)


def read_prompts(path: str | Path | None = None) -> list[str]:
    """One prompt per line; blank lines and '#' comments skipped."""
    file = Path(path) if path is not None else SEED_PROMPTS
    if not file.is_file():
        raise InvalidRequest(f"{file}: prompt file not found")
    lines = [ln.strip() for ln in file.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(prompts) < 2:
        raise InvalidRequest(f"{file}: need at least 2 prompts (one is held out)")
    return prompts


def split_prompts(prompts: list[str]) -> tuple[list[str], list[str]]:
    """(train, held_out); a list shorter than HELD_OUT_EVERY still holds out its last prompt."""
    every = min(HELD_OUT_EVERY, len(prompts))
    held = [p for i, p in enumerate(prompts) if i % every == every - 1]
    return [p for i, p in enumerate(prompts) if i % every != every - 1], held


def chat_ids(loaded: LoadedModel, prompt: str) -> list[int]:
    tok = loaded.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": prompt}])
    return tok.encode(text)


def generate_many(
    loaded: LoadedModel,
    jobs: Iterator[tuple[list[int], SamplingParams]],
    max_batch: int,
    budget: int | None = None,
    progress: Bar | None = None,
    on_finish: Callable[[int, Sample, SequenceCache], None] | None = None,
    num_threads: int | None = None,
) -> list[Sample]:
    """Run jobs at the last exit with continuous batching; stops taking new jobs once `budget`
    completion tokens are done (in-flight ones finish). Samples come back in job order;
    `on_finish(index, sample, cache)` sees each one's engine cache as it finishes.
    `num_threads` caps torch's threads meanwhile: sampling runs a few small ops per token, and
    on a busy machine their thread synchronisation costs more than their work (measured 4x)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _generate(loaded, jobs, max_batch, budget, progress, on_finish)
    finally:
        torch.set_num_threads(previous)


def _generate(
    loaded: LoadedModel,
    jobs: Iterator[tuple[list[int], SamplingParams]],
    max_batch: int,
    budget: int | None,
    progress: Bar | None,
    on_finish: Callable[[int, Sample, SequenceCache], None] | None,
) -> list[Sample]:
    from ruyiflow.engine.engine import Engine
    from ruyiflow.engine.kv_pool import CacheConfig
    from ruyiflow.engine.torch_runner import TorchRunner

    # contiguous caches: `on_finish` reads a finished sequence's boundary states, which a paged
    # pool would already have taken back
    engine = Engine(TorchRunner(loaded, CacheConfig(paged=False)), max_batch=max_batch)
    last = loaded.config.last_exit
    order: list[str] = []
    prompts: dict[str, list[int]] = {}
    generated: dict[str, list[int]] = {}
    caches: dict[str, SequenceCache] = {}  # kept until the sequence finishes
    done_tokens = 0
    index = {}  # seq id -> job number
    jobs = iter(jobs)
    exhausted = False
    while True:
        while not exhausted and len(engine.running) + len(engine.waiting) < max_batch:
            if budget is not None and done_tokens >= budget:
                exhausted = True
                break
            job = next(jobs, None)
            if job is None:
                exhausted = True
                break
            seq_id = engine.add_request(job[0], job[1], last)
            index[seq_id] = len(order)
            order.append(seq_id)
            prompts[seq_id], generated[seq_id] = job[0], []
            caches[seq_id] = engine.sequences[seq_id].cache
        if not engine.has_work():
            break
        for event in engine.step():
            generated[event.seq_id].append(event.token_id)
            done_tokens += 1
            cache = caches.pop(event.seq_id) if event.finished else None
            if cache is not None and on_finish is not None:
                prompt = prompts[event.seq_id]
                sample = Sample(prompt + generated[event.seq_id], len(prompt))
                on_finish(index[event.seq_id], sample, cache)
        if progress is not None:
            progress.advance_to(min(done_tokens, progress.total), sequences=len(order))
    return [Sample(prompts[s] + generated[s], len(prompts[s])) for s in order]


def _train_jobs(
    ids: list[list[int]], settings: CorpusSettings
) -> Iterator[tuple[list[int], SamplingParams]]:
    for round_index in range(MAX_ROUNDS):
        for i, prompt in enumerate(ids):
            if round_index == 0:
                yield prompt, SamplingParams(max_tokens=settings.max_new_tokens)
            else:
                seed = (settings.seed * 1_000_003 + round_index * 10_007 + i) % 2**63
                yield (
                    prompt,
                    SamplingParams(
                        max_tokens=settings.max_new_tokens,
                        temperature=settings.temperature,
                        seed=seed,
                    ),
                )


def build_corpus(
    loaded: LoadedModel,
    prompts: list[str],
    settings: CorpusSettings,
    quiet: bool = False,
    on_train_finish: Callable[[int, Sample, SequenceCache], None] | None = None,
) -> Corpus:
    """Held-out greedy answers, then the training samples (`on_train_finish` sees each one's
    cache, so features need no second pass over the trunk)."""
    train_prompts, held_prompts = split_prompts(prompts)
    train_ids = [chat_ids(loaded, p) for p in train_prompts]
    greedy = SamplingParams(max_tokens=settings.max_new_tokens)
    held_budget = len(held_prompts) * settings.max_new_tokens
    with progress_bar(held_budget, "corpus held-out", "tok", disable=quiet) as bar:
        held = generate_many(
            loaded,
            ((chat_ids(loaded, p), greedy) for p in held_prompts),
            settings.max_batch,
            progress=bar,
        )
    with progress_bar(settings.tokens, "corpus train", "tok", disable=quiet) as bar:
        train = generate_many(
            loaded,
            _train_jobs(train_ids, settings),
            settings.max_batch,
            settings.tokens,
            bar,
            on_train_finish,
            num_threads=1,
        )
    return Corpus(train, held)


def corpus_key(fingerprint: str, prompts: list[str], settings: CorpusSettings) -> str:
    text = json.dumps([CORPUS_VERSION, fingerprint, prompts, asdict(settings)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def read_corpus(out_dir: Path, key: str) -> Corpus | None:
    """`out_dir/corpus.json` when it was made from the same model, prompts and settings."""
    file = Path(out_dir) / CORPUS_FILE
    if not file.is_file():
        return None
    try:
        cached = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if cached.get("key") != key:
        return None
    return Corpus(
        [Sample(ids, n) for n, ids in cached["train"]],
        [Sample(ids, n) for n, ids in cached["held_out"]],
    )


def write_corpus(corpus: Corpus, out_dir: Path, key: str, fingerprint: str) -> None:
    data = {
        "key": key,
        "fingerprint": fingerprint,
        "train": [[s.num_prompt, s.ids] for s in corpus.train],
        "held_out": [[s.num_prompt, s.ids] for s in corpus.held_out],
    }
    file = Path(out_dir) / CORPUS_FILE
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(file)
