"""`ruyiflow train-probe`: train the trunk probe of one exit from `eval exits` results and their
first-token features, and write it as `DIR/probe-e{E}.onnx` for the nodes' confidence gate.

Only the learn half of the prompts is used (`ruyiflow.scorer.split`): the other half stays
unseen for `ruyiflow calibrate --risk`, which tests the probe's thresholds on it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True, help="`ruyiflow eval exits` results (JSON Lines)")
    p.add_argument(
        "--features",
        default=None,
        help="their first-token features (`eval exits --features`), default <results>.features.npz",
    )
    p.add_argument("--exit", type=int, required=True, dest="exit_layer", help="exit to probe")
    p.add_argument("--out", required=True, help="directory to write probe-e<E>.onnx into")
    p.add_argument("--hidden", type=int, default=0, help="hidden ReLU width; 0: logistic")
    p.add_argument("--epochs", type=int, default=400, help="full-batch training steps")
    p.add_argument("--seed", type=int, default=0)


def default_features(results: str) -> Path:
    return Path(results).with_suffix(".features.npz")


def probe_data(results_path: str, features_path: str | Path, exit_layer: int, learn_only: bool):
    """(features [N, D], agreement targets [N], prompt ids, fingerprint) at `exit_layer`."""
    import numpy as np

    from ruyiflow.engine.errors import InvalidRequest
    from ruyiflow.evaluation.features import load_first_tokens
    from ruyiflow.evaluation.results import load_results
    from ruyiflow.node.probe import probe_input
    from ruyiflow.scorer.split import is_learn

    results = load_results(results_path)
    fingerprint = results[0].fingerprint
    table = load_first_tokens(features_path, fingerprint)
    if exit_layer not in table.exits or exit_layer == results[0].deepest:
        raise InvalidRequest(f"exit {exit_layer} is not a shallow exit of {list(table.exits)}")
    j = table.column(exit_layer)
    chosen = [r for r in results if is_learn(r.id) or not learn_only]
    rows = [table.row(r.id) for r in chosen]
    x = np.stack(
        [
            probe_input(
                table.pooled[i, j], table.max_prob[i, j], table.margin[i, j], table.entropy[i, j]
            )
            for i in rows
        ]
    )
    y = np.array([r.exits[exit_layer].agreement for r in chosen], np.float32)
    return x, y, [r.id for r in chosen], fingerprint


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ruyiflow.node.probe import Probe, probe_path
    from ruyiflow.scorer.probe_train import ProbeConfig, build_onnx, train_probe, write_probe

    torch.set_num_threads(1)  # a [126, 1155] problem: more threads only contend (10x slower)
    features = args.features or default_features(args.results)
    x, y, ids, fingerprint = probe_data(args.results, features, args.exit_layer, learn_only=True)
    config = ProbeConfig(epochs=args.epochs, hidden=args.hidden, seed=args.seed)
    started = time.perf_counter()
    trained = train_probe(x, y, config)
    cv = ", ".join(f"{d:g}: {loss:.4f}" for d, loss in trained.cv_loss.items())
    print(
        f"exit {args.exit_layer}: {len(ids)} learn-half prompts, {x.shape[1]} features, mean "
        f"agreement {y.mean():.3f}; {config.folds}-fold cross-entropy by weight decay: {cv}; "
        f"chose {trained.decay:g} ({time.perf_counter() - started:.1f} s)"
    )
    hidden_size = (x.shape[1] - 3) // 2
    training = {
        "prompts": len(ids),
        "split": "learn",
        "weight_decay": trained.decay,
        "hidden": config.hidden,
        "epochs": config.epochs,
        "seed": config.seed,
        "results": Path(args.results).name,
    }
    model = build_onnx(trained.net, args.exit_layer, hidden_size, fingerprint, training)
    out = probe_path(args.out, args.exit_layer)
    num_bytes = write_probe(model, out)
    probe = Probe(out, fingerprint)  # what the nodes load: check it computes what torch does
    drift = float(np.abs(probe.predict(x) - trained.net.predict(x)).max())
    print(
        f"wrote {out} ({num_bytes} bytes, digest {probe.digest}); ONNX vs torch max |dp| "
        f"{drift:.2e}"
    )
    return 0
