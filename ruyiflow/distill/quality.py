"""Exit quality on held-out text: for the last exit's greedy answers to held-out prompts, each
exit's perplexity of those answers, its top-1 agreement with the last exit, and its KL from the
last exit, over every answer token. All three should improve with depth, and with training."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ruyiflow.distill.corpus import Sample
from ruyiflow.distill.features import answer_rows, boundary_states, exit_logits, sample_groups
from ruyiflow.engine.model import FamilyModel


@dataclass(frozen=True)
class ExitQuality:
    exit: int
    perplexity: float
    top1_agreement: float  # fraction of answer tokens where argmax equals the last exit's
    kl: float  # KL(last exit || this exit), mean per answer token
    num_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


Groups = list[tuple[list[Sample], list[dict[int, torch.Tensor]]]]


def trunk_states(model: FamilyModel, samples: list[Sample]) -> Groups:
    """Samples with an answer, grouped, with their boundary states: the trunk is the same with
    or without an overlay, so one pass serves every comparison."""
    usable = [s for s in samples if len(s.ids) > s.num_prompt]
    out = []
    for group in sample_groups(usable):
        chunk = [usable[i] for i in group]
        out.append((chunk, boundary_states(model, chunk)))
    return out


def exit_quality(
    model: FamilyModel, samples: list[Sample], groups: Groups | None = None
) -> list[ExitQuality]:
    """Quality of every exit of `model` on the answers of `samples` (one row per exit);
    `groups` from `trunk_states` saves the trunk pass."""
    exits = model.config.exits
    nll = dict.fromkeys(exits, 0.0)
    agree = dict.fromkeys(exits, 0)
    kl = dict.fromkeys(exits, 0.0)
    count = 0
    for chunk, states in groups if groups is not None else trunk_states(model, samples):
        lengths = [len(s.ids) - 1 for s in chunk]
        # position t predicts answer token t + 1: t from num_prompt - 1 to len - 2
        rows = answer_rows(chunk)
        targets = torch.tensor([t for s in chunk for t in s.ids[s.num_prompt :]])
        ref_logp = None
        for e in reversed(exits):  # last exit first: the reference for the others
            h = torch.cat([st[e] for st in states])
            logp = torch.log_softmax(exit_logits(model, e, h, lengths, rows), dim=-1)
            if ref_logp is None:
                ref_logp = logp
            nll[e] += float(-logp.gather(-1, targets[:, None]).sum())
            agree[e] += int((logp.argmax(-1) == ref_logp.argmax(-1)).sum())
            kl[e] += float((ref_logp.exp() * (ref_logp - logp)).sum())
        count += len(targets)
    n = max(count, 1)
    return [ExitQuality(e, math.exp(nll[e] / n), agree[e] / n, kl[e] / n, count) for e in exits]


def quality_table(untrained: list[ExitQuality], trained: list[ExitQuality] | None) -> str:
    """Plain-text table, one row per exit: untrained copies vs trained branches."""
    head = f"{'exit':>5} {'ppl untrained':>14} {'top1 untrained':>15} {'kl untrained':>13}"
    if trained is not None:
        head += f" {'ppl trained':>12} {'top1 trained':>13} {'kl trained':>11}"
    lines = [head]
    by_exit = {q.exit: q for q in trained or []}
    for q in untrained:
        line = f"{q.exit:>5} {q.perplexity:>14.2f} {q.top1_agreement:>15.3f} {q.kl:>13.3f}"
        if trained is not None:
            t = by_exit[q.exit]
            line += f" {t.perplexity:>12.2f} {t.top1_agreement:>13.3f} {t.kl:>11.3f}"
        lines.append(line)
    tokens = untrained[0].num_tokens if untrained else 0
    lines.append(f"({tokens} held-out answer tokens; top1/kl are against the last exit)")
    return "\n".join(lines)
