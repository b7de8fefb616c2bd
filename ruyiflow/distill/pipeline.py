"""The distillation run end to end: load the base model (no overlay), build or reuse the corpus
and features in the out dir, train (or resume), write `overlay.safetensors`, and measure exit
quality on held-out prompts before and after (`report.json`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ruyiflow.distill.corpus import (
    Corpus,
    CorpusSettings,
    Sample,
    build_corpus,
    chat_ids,
    corpus_key,
    generate_many,
    read_corpus,
    read_prompts,
    split_prompts,
    write_corpus,
)
from ruyiflow.distill.features import (
    FeatureBuilder,
    Features,
    compute_features,
    features_key,
    read_features,
    save_features,
)
from ruyiflow.distill.overlay import overlay_tensors, save_overlay
from ruyiflow.distill.quality import ExitQuality, exit_quality, trunk_states
from ruyiflow.distill.train import Trainer, TrainSettings
from ruyiflow.engine.checkpoint import EMBEDDED, LoadedModel, load_model
from ruyiflow.engine.config import RUYI_FAMILIES, load_hf_config
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.overlay import OverlayMeta, apply_overlay, read_overlay
from ruyiflow.engine.sampling import SamplingParams

OVERLAY_FILE = "overlay.safetensors"
REPORT_FILE = "report.json"


@dataclass
class DistillResult:
    overlay: Path
    steps: int
    train_seconds: float
    num_train_samples: int
    num_train_tokens: int  # completion tokens of the corpus
    num_rows: int  # tokens through the branch per epoch (prompt + answer)
    overlay_bytes: int
    untrained: list[ExitQuality]
    trained: list[ExitQuality]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["overlay"] = str(self.overlay)
        return d


def is_native_family(source: str) -> bool:
    """Ruyi checkpoints have their own branches; plain models get `exits` added."""
    path = Path(source).expanduser()
    if source == EMBEDDED or not path.is_dir():
        return False
    return load_hf_config(path).get("model_type") in RUYI_FAMILIES


def load_base(source: str, exits: tuple[int, ...]) -> LoadedModel:
    """float32, no overlay; a plain model gets `exits` as extra exits."""
    extra = None if is_native_family(source) else exits
    return load_model(source, "float32", extra, overlay="none")


def distill(
    source: str,
    exits: tuple[int, ...],
    out_dir: Path,
    corpus_settings: CorpusSettings,
    train_settings: TrainSettings,
    top_k: int = 64,
    prompts_file: str | Path | None = None,
    resume: bool = False,
    quiet: bool = False,
    on_step: Callable[[int], None] | None = None,
    overlay_dtype: torch.dtype = torch.float16,
    num_threads: int | None = None,
) -> DistillResult:
    """The whole run. `num_threads` caps torch's threads for it (on a shared CPU one thread
    trained faster than two: the many mid-sized ops wait on each other's synchronisation)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _distill(
            source,
            exits,
            Path(out_dir),
            corpus_settings,
            train_settings,
            top_k,
            prompts_file,
            resume,
            quiet,
            on_step,
            overlay_dtype,
        )
    finally:
        torch.set_num_threads(previous)


def _distill(
    source: str,
    exits: tuple[int, ...],
    out_dir: Path,
    corpus_settings: CorpusSettings,
    train_settings: TrainSettings,
    top_k: int,
    prompts_file: str | Path | None,
    resume: bool,
    quiet: bool,
    on_step: Callable[[int], None] | None,
    overlay_dtype: torch.dtype,
) -> DistillResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    if tuple(train_settings.exits) != tuple(exits):
        raise InvalidRequest("train settings and --exits name different exits")
    loaded = load_base(source, exits)
    base_fp = loaded.fingerprint
    prompts = read_prompts(prompts_file)
    k = min(top_k, loaded.config.vocab_size - 1)
    fkey = features_key(corpus_key(base_fp, prompts, corpus_settings), exits, k)
    corpus, features = prepare_data(loaded, prompts, corpus_settings, exits, k, out_dir, quiet)
    trainer = Trainer(loaded.model, features, train_settings, fkey)
    if resume and not trainer.restore(out_dir) and not quiet:
        print("[distill] no checkpoint to resume from; starting at step 0", file=sys.stderr)
    seconds = trainer.run(out_dir, quiet, on_step)
    meta = OverlayMeta(
        base_fingerprint=base_fp,
        exits=tuple(exits),
        rank=train_settings.rank,
        scale=train_settings.alpha / train_settings.rank,
        training={
            "steps": trainer.step,
            "batch_size": train_settings.batch_size,
            "lr": train_settings.lr,
            "seed": train_settings.seed,
            "ce_weight": train_settings.ce_weight,
            "top_k": k,
            "train_samples": len(corpus.train),
            "train_answer_tokens": corpus.num_completion_tokens(),
        },
    )
    path = out_dir / OVERLAY_FILE
    save_overlay(path, meta, overlay_tensors(trainer.loras), overlay_dtype)
    untrained, trained = compare(loaded, corpus.held_out, path)
    result = DistillResult(
        overlay=path,
        steps=trainer.step,
        train_seconds=seconds,
        num_train_samples=len(corpus.train),
        num_train_tokens=corpus.num_completion_tokens(),
        num_rows=sum(features.lengths),
        overlay_bytes=path.stat().st_size,
        untrained=untrained,
        trained=trained,
    )
    (out_dir / REPORT_FILE).write_text(json.dumps(result.to_dict(), indent=2))
    return result


def prepare_data(
    loaded: LoadedModel,
    prompts: list[str],
    settings: CorpusSettings,
    exits: tuple[int, ...],
    top_k: int,
    out_dir: Path,
    quiet: bool,
) -> tuple[Corpus, Features]:
    """Corpus and features from the out dir's caches when they match, else built (features
    straight from the generations' caches when the corpus is new)."""
    ckey = corpus_key(loaded.fingerprint, prompts, settings)
    fkey = features_key(ckey, exits, top_k)
    corpus = read_corpus(out_dir, ckey)
    if corpus is None:
        builder = FeatureBuilder(loaded.model, exits, top_k)
        corpus = build_corpus(
            loaded,
            prompts,
            settings,
            quiet,
            lambda i, sample, cache: builder.add_cache(i, sample, cache),
        )
        if not corpus.train:
            raise InvalidRequest("the corpus is empty; give more prompts or tokens")
        features = builder.build(len(corpus.train))
        write_corpus(corpus, out_dir, ckey, loaded.fingerprint)
        save_features(features, out_dir, fkey)
        return corpus, features
    features = read_features(out_dir, fkey, exits)
    if features is None:
        features = compute_features(loaded.model, corpus.train, exits, top_k, quiet)
        save_features(features, out_dir, fkey)
    return corpus, features


def compare(
    loaded: LoadedModel, held_out: list[Sample], overlay_path: Path | None
) -> tuple[list[ExitQuality], list[ExitQuality] | None]:
    """Quality of the untrained copies, then (overlay merged in place, as `load_model` would
    merge it) of the trained branches. `loaded` must be the base model without overlay."""
    groups = trunk_states(loaded.model, held_out)
    untrained = exit_quality(loaded.model, held_out, groups)
    if overlay_path is None:
        return untrained, None
    apply_overlay(loaded.model, read_overlay(overlay_path), loaded.fingerprint)
    return untrained, exit_quality(loaded.model, held_out, groups)


def held_out_samples(
    loaded: LoadedModel,
    out_dir: Path | None,
    prompts_file: str | Path | None,
    max_new_tokens: int,
    max_batch: int = 16,
) -> list[Sample]:
    """The corpus's held-out answers when `out_dir` has a corpus for this model, else the last
    exit's greedy answers to the held-out seed prompts (generated now)."""
    if out_dir is not None and (Path(out_dir) / "corpus.json").is_file():
        data = json.loads((Path(out_dir) / "corpus.json").read_text())
        if data.get("fingerprint") == loaded.fingerprint:
            return [Sample(ids, n) for n, ids in data["held_out"]]
    _, held = split_prompts(read_prompts(prompts_file))
    greedy = SamplingParams(max_tokens=max_new_tokens)
    return generate_many(loaded, ((chat_ids(loaded, p), greedy) for p in held), max_batch)
