"""Scorers by name, as `router.scorer` in topology.yaml names them: `heuristic` (v1, cue and
length based) and `learned` (an ONNX classifier; onnxruntime loads only when it is chosen)."""

from __future__ import annotations

import importlib

from ruyiflow.router.scorer import Scorer

# name -> "module:class"; a class takes the scorer's `path` (weights) when the topology gives one
SCORERS = {
    "heuristic": "ruyiflow.router.scorer:HeuristicScorer",
    "learned": "ruyiflow.router.learned_scorer:LearnedScorer",
}


def scorer_names() -> tuple[str, ...]:
    return tuple(sorted(SCORERS))


def make_scorer(name: str, path: str | None = None) -> Scorer:
    """Build the scorer registered as `name`; `path` goes to scorers that load weights."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; available: {', '.join(scorer_names())}")
    module_name, _, class_name = SCORERS[name].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(path) if path is not None else cls()
