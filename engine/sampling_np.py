"""Sampling in numpy for the ONNX Runtime engine (no torch): the same processors in the same
order as `engine.sampling` (repetition penalty, no-repeat-ngram ban, temperature, top-k, top-p,
min-p), a draw from the request's own `numpy.random.Generator`, and the exit-confidence triple.

Greedy tokens equal the torch engine's; sampled tokens follow the same distribution but another
random stream (numpy's PCG64, seeded with the request's seed)."""

from __future__ import annotations

import os

import numpy as np

from ruyiflow.engine.ngrams import NgramIndex
from ruyiflow.engine.sampling_params import SamplingParams


def make_generator(seed: int | None) -> tuple[np.random.Generator, int]:
    """A private generator; an unseeded request draws a seed (recorded for handoff)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    return np.random.default_rng(seed), seed


def process_row(
    logits: np.ndarray, params: SamplingParams, tokens: list[int], ngrams: NgramIndex | None
) -> np.ndarray:
    """logits [V] float32 -> processed logits [V] (a new array)."""
    logits = np.array(logits, dtype=np.float32, copy=True)
    if params.repetition_penalty != 1.0 and tokens:
        ids = np.array(sorted(set(tokens)), dtype=np.int64)
        picked = logits[ids]
        penalty = params.repetition_penalty
        logits[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    if ngrams is not None:
        banned = ngrams.banned(tokens)
        if banned:
            logits[np.array(sorted(banned), dtype=np.int64)] = -np.inf
    if params.is_greedy:
        return logits
    logits = logits / np.float32(params.temperature)
    if 0 < params.top_k < logits.size:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < kth, -np.inf, logits).astype(np.float32)
    if params.top_p < 1.0:
        order = np.argsort(logits, kind="stable")  # ascending
        sorted_logits = logits[order]
        cumulative = np.cumsum(softmax(sorted_logits))
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False  # always keep the most likely token
        sorted_logits = np.where(remove, -np.inf, sorted_logits)
        logits = np.empty_like(logits)
        logits[order] = sorted_logits
    if params.min_p > 0.0:
        probs = softmax(logits.astype(np.float64))
        logits = np.where(probs < params.min_p * probs.max(), -np.inf, logits).astype(np.float32)
    return logits


def softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def draw(logits: np.ndarray, params: SamplingParams, generator: np.random.Generator) -> int:
    """One token from processed logits [V]."""
    if params.is_greedy:
        return int(np.argmax(logits))
    probs = softmax(logits.astype(np.float64))
    return int(generator.choice(probs.size, p=probs))


def exit_confidence(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """logits [B, V] -> (max_prob, top-2 margin, entropy in nats), each [B]."""
    x = logits.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    z = np.exp(shifted)
    total = z.sum(axis=-1, keepdims=True)
    probs = z / total
    top2 = np.partition(probs, -2, axis=-1)[:, -2:]
    max_prob = top2.max(axis=-1)
    margin = max_prob - top2.min(axis=-1)
    entropy = np.log(total[:, 0]) - (probs * shifted).sum(axis=-1)
    return max_prob, margin, entropy
