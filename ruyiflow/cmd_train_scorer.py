"""`ruyiflow train-scorer`: train the learned difficulty scorer on an evaluation results file
(prompt → label exit) and export it to ONNX for the router (`scorer: {name: learned, path}`)."""

from __future__ import annotations

import argparse
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True, help="`ruyiflow eval exits` results (training set)")
    p.add_argument("--out", required=True, help="ONNX file to write, e.g. scorer.onnx")
    p.add_argument("--heldout", default=None, help="results file to report held-out accuracy on")
    p.add_argument("--epochs", type=int, default=300, help="full-batch training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=int, default=0, help="MLP width; 0: logistic regression")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--model-name", default="smollm2", help="model whose exits label the data")
    p.add_argument(
        "--label",
        choices=["agreement", "answer"],
        default="answer",
        help="agreement: the results' label_exit (greedy agreement >= 0.9 with the deepest); "
        "answer: the shallowest exit as right as the deepest, on prompts with a short answer "
        "(the others are left out)",
    )


def labelled(path: str, classes: tuple[int, ...] | None = None, label: str = "agreement"):
    """(features [N, D], class indices [N], classes, conversations) of a results file."""
    import numpy as np

    from ruyiflow.engine.errors import InvalidRequest
    from ruyiflow.evaluation.results import answer_label, load_results
    from ruyiflow.router.features import featurize_batch

    results = load_results(path)
    exits = tuple(results[0].exits)  # ascending, the same in every record
    if len(exits) < 2:
        raise InvalidRequest(f"{path}: needs results for two or more exits, got {list(exits)}")
    if classes is not None and exits != classes:
        raise InvalidRequest(f"{path}: exits {list(exits)} differ from training's {list(classes)}")
    if label == "answer":  # only prompts whose answer can be checked carry that label
        results = [r for r in results if r.exits[max(r.exits)].answer_match is not None]
        if not results:
            raise InvalidRequest(f"{path}: no prompt has a checkable answer; use --label agreement")
    conversations = [r.prompt.conversation() for r in results]
    features = featurize_batch(conversations)
    pick = answer_label if label == "answer" else (lambda r: r.label_exit)
    labels = np.array([exits.index(pick(r)) for r in results], dtype=np.int64)
    return features, labels, exits, conversations


def latency_us(scorer, conversations: list) -> tuple[float, float]:
    """(mean, p99) microseconds of `scorer.score` per conversation, as the router runs it."""
    import numpy as np

    timings = []
    for conversation in conversations:
        started = time.perf_counter()
        scorer.score(conversation)
        timings.append((time.perf_counter() - started) * 1e6)
    return float(np.mean(timings)), float(np.percentile(timings, 99))


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ruyiflow.router.learned_scorer import LearnedScorer
    from ruyiflow.scorer.export import export_classifier
    from ruyiflow.scorer.train import TrainConfig, accuracy, train_classifier

    config = TrainConfig(
        epochs=args.epochs, seed=args.seed, hidden=args.hidden, weight_decay=args.weight_decay
    )
    features, labels, classes, conversations = labelled(args.results, label=args.label)
    counts = np.bincount(labels, minlength=len(classes))
    print(
        f"{len(labels)} prompts, label exits: "
        + ", ".join(f"{e}: {n}" for e, n in zip(classes, counts, strict=True))
    )
    if np.count_nonzero(counts) < 2:
        print("warning: every prompt has the same label exit; the scorer can only learn that")
    started = time.perf_counter()
    classifier = train_classifier(features, labels, len(classes), config)
    kind = f"MLP hidden {config.hidden}" if config.hidden else "logistic regression"
    train = accuracy(classifier.probabilities(features), labels)
    elapsed = time.perf_counter() - started
    print(f"trained {kind}, {features.shape[1]} features, {elapsed:.1f} s; train {train.line()}")
    num_bytes = export_classifier(classifier, classes, args.out, args.model_name)
    scorer = LearnedScorer(args.out)  # what the router will load: check it agrees with torch
    sample = features[: min(len(features), 64)]
    (onnx_probs,) = scorer.session.run(["probabilities"], {"features": sample})
    drift = float(np.abs(onnx_probs - classifier.probabilities(sample)).max())
    print(f"wrote {args.out} ({num_bytes} bytes); ONNX vs torch max |dp| {drift:.2e}")
    mean_us, p99_us = latency_us(scorer, conversations)
    print(f"score latency per request: mean {mean_us:.0f} us, p99 {p99_us:.0f} us")
    if args.heldout:
        held_features, held_labels, _, _ = labelled(args.heldout, classes, args.label)
        (held_probs,) = scorer.session.run(["probabilities"], {"features": held_features})
        print(f"held-out {accuracy(held_probs, held_labels).line()}")
    return 0
