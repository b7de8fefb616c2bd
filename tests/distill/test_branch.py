"""The training forward is the serving branch; the hand-written loss gradient is autograd's."""

from __future__ import annotations

import torch

from ruyiflow.distill.branch import BranchWeights, LoraBranch, branch_forward
from ruyiflow.distill.corpus import Sample
from ruyiflow.distill.features import boundary_states, exit_logits
from ruyiflow.distill.train import DistillLoss, distill_loss
from ruyiflow.engine.checkpoint import load_model
from ruyiflow.engine.model import Work
from ruyiflow.engine.overlay import merged_branch

IDS = [5, 17, 33, 100, 2, 9, 250, 11, 40]


def serving_logits(model, ids, exit_layer):
    return model.forward([Work(model.new_cache(), ids, 0, exit_layer)])[0]


def test_branch_forward_equals_serving_at_every_exit(tiny_dir):
    loaded = load_model(str(tiny_dir), extra_exits=[1, 2], overlay="none")
    m = loaded.model
    samples = [Sample(IDS + [0], 3), Sample(IDS[:5] + [0], 2)]  # last token is only predicted
    states = boundary_states(m, samples)
    for e in loaded.config.exits:
        h = torch.cat([st[e] for st in states])
        got = exit_logits(m, e, h, [9, 5], torch.tensor([8, 13]))  # last fed row of each
        torch.testing.assert_close(got[0], serving_logits(m, IDS, e), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], serving_logits(m, IDS[:5], e), rtol=1e-5, atol=1e-5)


def test_lora_with_zero_b_is_the_base_branch_and_merges_exactly(tiny_dir):
    m = load_model(str(tiny_dir), extra_exits=[1, 2], overlay="none").model
    gen = torch.Generator().manual_seed(0)
    lora = LoraBranch(m.branches[1], m.geo, rank=3, alpha=6.0, generator=gen)
    h = torch.randn(7, m.config.hidden_size, generator=gen)
    base = branch_forward(BranchWeights(m.branches[1]), h, [4, 3], m.geo, m.rope)
    with torch.no_grad():
        same = branch_forward(BranchWeights(m.branches[1], lora), h, [4, 3], m.geo, m.rope)
    torch.testing.assert_close(same, base)
    with torch.no_grad():  # a non-zero delta: merged weights == low-rank forward
        for p in lora.lora_b.values():
            p.normal_(0, 0.05, generator=gen)
        lora.norms["norm"].mul_(1.5)
        delta = branch_forward(BranchWeights(m.branches[1], lora), h, [4, 3], m.geo, m.rope)
    merged = merged_branch(m, 1, *lora.factors(), lora.scale)
    got = branch_forward(BranchWeights(merged), h, [4, 3], m.geo, m.rope)
    torch.testing.assert_close(got, delta, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-2


def test_hand_written_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    n, vocab, k = 6, 50, 8
    teacher = torch.log_softmax(torch.randn(n, vocab, generator=gen) * 3, -1).double()
    top, ids = teacher.topk(k, -1)
    tail = teacher.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    teacher_logp = torch.cat([top, tail], -1)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    for ce_weight in (0.0, 0.5):
        z = (torch.randn(n, vocab, generator=gen) * 2).double().requires_grad_()
        ref_loss, ref_kl = distill_loss(z, ids, teacher_logp, targets, ce_weight)
        (ref_loss * 1.7).backward()
        ref_grad, z.grad = z.grad.clone(), None
        loss, kl = DistillLoss.apply(z, ids, teacher_logp, targets, ce_weight)
        (loss * 1.7).backward()
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(kl, ref_kl)
        torch.testing.assert_close(z.grad, ref_grad)
    # the KL is zero for the teacher itself
    zero, _ = distill_loss(teacher.clone(), ids, teacher_logp, targets, 0.0)
    assert abs(float(zero)) < 1e-6  # the tail clamp (mass below 1e-6) is the only error
