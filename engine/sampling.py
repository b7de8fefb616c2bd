"""Per-request sampling: parameters, logits processors and the draw itself.

Order follows Hugging Face `generate`: repetition penalty, no-repeat-ngram ban, temperature,
top-k, top-p, min-p, then a multinomial draw from the request's own `torch.Generator`, so the
same seed gives the same tokens whatever else shares the batch. Temperature 0 means greedy.
"""

from __future__ import annotations

import os

import torch

from ruyiflow.engine.ngrams import NgramIndex
from ruyiflow.engine.sampling_params import SamplingParams  # noqa: F401 (re-exported: one import site)


def make_generator(seed: int | None) -> tuple[torch.Generator, int]:
    """A private CPU generator; an unseeded request draws a seed (recorded for handoff)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen, seed


def process_row(
    logits: torch.Tensor, params: SamplingParams, tokens: list[int], ngrams: NgramIndex | None
) -> torch.Tensor:
    """logits [V] float32 -> processed logits [V] (a new tensor)."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0 and tokens:
        ids = torch.tensor(sorted(set(tokens)), dtype=torch.long)
        picked = logits[ids]
        picked = torch.where(
            picked < 0, picked * params.repetition_penalty, picked / params.repetition_penalty
        )
        logits[ids] = picked
    if ngrams is not None:
        banned = ngrams.banned(tokens)
        if banned:
            logits[torch.tensor(sorted(banned), dtype=torch.long)] = float("-inf")
    if params.is_greedy:
        return logits
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - params.top_p)
        remove[-1] = False  # always keep the most likely token
        logits = logits.scatter(0, order, sorted_logits.masked_fill(remove, float("-inf")))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from processed logits [V]."""
    if params.is_greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
