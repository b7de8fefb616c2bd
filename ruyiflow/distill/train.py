"""Self-distillation of exit branches: the trunk and head are frozen; per exit, LoRA deltas on the
branch layer's projections and its three norm vectors learn to match the last exit.

Loss per exit: KL(teacher || student) over the teacher's top-k tokens plus one tail bucket (the
rest of the mass on both sides), averaged over loss positions, plus `ce_weight` times the
cross-entropy of the corpus's next token. One AdamW over every exit's parameters; each exit's
gradient is clipped on its own. The batch of step s and its learning rate are pure functions of
(seed, s), so a run resumed from a checkpoint continues exactly the same schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ruyiflow.distill.branch import BranchWeights, LoraBranch, branch_forward
from ruyiflow.distill.features import Features, loss_rows
from ruyiflow.engine.errors import InvalidRequest
from ruyiflow.engine.model import FamilyModel
from ruyiflow.progress import progress_bar

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainSettings:
    exits: tuple[int, ...]
    rank: int = 16
    alpha: float = 32.0
    steps: int = 200
    batch_size: int = 8  # sequences per step
    lr: float = 5e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * this
    warmup_steps: int = 10
    ce_weight: float = 0.0
    clip: float = 1.0
    bf16_head: bool = True  # student logits through a bfloat16 copy of the head (speed)
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        object.__setattr__(self, "exits", tuple(self.exits))
        checks = [
            (bool(self.exits), "train at least one exit"),
            (self.rank >= 1, "rank must be >= 1"),
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch size must be >= 1"),
            (self.lr > 0, "learning rate must be positive"),
            (self.checkpoint_every >= 1, "checkpoint interval must be >= 1"),
            (self.ce_weight >= 0, "ce weight must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidRequest(message)


def batch_indices(num_samples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Samples of step `step`: consecutive slices of one seeded permutation per epoch."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, num_samples)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(num_samples, generator=gen).tolist()
        out.append(perms[epoch][k])
    return out


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    span = max(s.steps - s.warmup_steps - 1, 1)
    progress = min((step - s.warmup_steps) / span, 1.0)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's two branches)."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def distill_loss(
    logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    targets: torch.Tensor,
    ce_weight: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student logits [N, V] -> (loss, bucketed KL), both scalars averaged over rows. Plain
    autograd: the oracle for `DistillLoss`, which computes the same with a hand-written
    gradient and a third of the passes over [N, V]."""
    lse = logits.logsumexp(-1, keepdim=True)  # [N, 1]
    top = logits.gather(-1, teacher_ids) - lse  # [N, k] student log-probs of teacher's top-k
    student = torch.cat([top, tail_logp(top)], dim=-1)  # [N, k + 1]
    kl = bucket_kl(teacher_logp, student)
    loss = kl
    if ce_weight > 0:
        nll = lse[:, 0] - logits.gather(-1, targets[:, None])[:, 0]
        loss = loss + ce_weight * nll.mean()
    return loss, kl.detach()


def tail_logp(top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(top))) [N, 1] without another pass over the vocabulary; the clamp keeps
    an empty student tail finite (below exp(-14) it no longer matters)."""
    return log1mexp(top.logsumexp(-1, keepdim=True).clamp(max=-1e-6))


def bucket_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) over k + 1 buckets [N, k + 1]."""
    p = teacher_logp.exp()
    # an empty teacher tail (k close to V) contributes 0, not 0 * inf
    terms = torch.where(p > 0, p * (teacher_logp - student_logp), torch.zeros_like(p))
    return terms.sum(-1).mean()


class DistillLoss(torch.autograd.Function):
    """loss = bucketed KL + ce_weight * CE, gradient by hand. With q = softmax(z), teacher
    bucket masses p_j (top-k) and p_tail, student tail mass Q_tail, and N rows:
    dloss/dz_v = (q_v * (1 - [v not in top-k] * p_tail / Q_tail) - p_v) / N
                 + ce_weight * (q_v - [v = target]) / N."""

    @staticmethod
    def forward(ctx, logits, teacher_ids, teacher_logp, targets, ce_weight):  # noqa: ANN001
        n = logits.shape[0]
        q = torch.softmax(logits, dim=-1)  # [N, V]; becomes the gradient buffer
        lse = logits.logsumexp(-1, keepdim=True)
        top = logits.gather(-1, teacher_ids) - lse  # [N, k]
        tail = tail_logp(top)  # [N, 1]
        kl = bucket_kl(teacher_logp, torch.cat([top, tail], dim=-1))
        loss = kl.clone()
        if ce_weight > 0:
            loss += ce_weight * (lse[:, 0] - logits.gather(-1, targets[:, None])[:, 0]).mean()
        p = teacher_logp.exp()
        w = ce_weight
        scale = 1 - p[:, -1:] / tail.exp() + w  # [N, 1], for tokens outside the top-k
        top_grad = top.exp() * (1 + w) - p[:, :-1]  # [N, k]
        ctx.save_for_backward(q, teacher_ids, targets, scale, top_grad)
        ctx.n, ctx.ce_weight = n, ce_weight
        return loss, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_kl):  # noqa: ANN001
        q, ids, targets, scale, top_grad = ctx.saved_tensors
        g = q.mul_(scale)  # q is not needed again: it becomes the gradient in place
        g.scatter_(-1, ids, top_grad)
        if ctx.ce_weight > 0:
            minus_w = torch.full(targets[:, None].shape, -ctx.ce_weight, dtype=g.dtype)
            g.scatter_add_(-1, targets[:, None], minus_w)
        return g.mul_(grad_loss / ctx.n), None, None, None, None


@dataclass
class Batch:
    lengths: list[int]
    rows: torch.Tensor  # boundary rows of the chosen samples, end to end
    loss_rows: torch.Tensor  # rows (within the batch) of loss positions
    teacher: torch.Tensor  # indices into the feature's loss arrays


def make_batch(features: Features, indices: list[int]) -> Batch:
    row_off, loss_off = features.row_offsets(), features.loss_offsets()
    lengths = [features.lengths[i] for i in indices]
    starts = [features.loss_starts[i] for i in indices]
    rows = torch.cat([torch.arange(row_off[i], row_off[i + 1]) for i in indices])
    teacher = torch.cat([torch.arange(loss_off[i], loss_off[i + 1]) for i in indices])
    return Batch(lengths, rows, loss_rows(lengths, starts), teacher)


def exit_loss(
    model: FamilyModel,
    exit_layer: int,
    lora: LoraBranch | None,
    features: Features,
    batch: Batch,
    ce_weight: float,
    head: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`head` [vocab, hidden] replaces the branch head in the product (a bfloat16 copy is ~4x
    faster on CPU; the logits come back float32)."""
    branch = model.branches[exit_layer]
    head = branch.head if head is None else head
    h = features.boundary[exit_layer][batch.rows]
    normed = branch_forward(BranchWeights(branch, lora), h, batch.lengths, model.geo, model.rope)
    logits = (normed[batch.loss_rows].to(head.dtype) @ head.T).float()  # [loss rows, vocab]
    loss, kl = DistillLoss.apply(
        logits,
        features.teacher_ids[batch.teacher],
        features.teacher_logp[batch.teacher],
        features.targets[batch.teacher],
        ce_weight,
    )
    return loss, kl.detach()


def mean_kl(
    model: FamilyModel,
    features: Features,
    exit_layer: int,
    lora: LoraBranch | None = None,
    batch_size: int = 16,
) -> float:
    """KL(teacher || exit) averaged over every loss position of `features`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(features.lengths), batch_size):
            idx = list(range(start, min(start + batch_size, len(features.lengths))))
            batch = make_batch(features, idx)
            _, kl = exit_loss(model, exit_layer, lora, features, batch, 0.0)
            total += float(kl) * len(batch.teacher)
            count += len(batch.teacher)
    return total / max(count, 1)


class Trainer:
    def __init__(self, model: FamilyModel, features: Features, settings: TrainSettings, key: str):
        if model.dtype != torch.float32:
            raise InvalidRequest("distillation trains a float32 model (load with dtype float32)")
        shallow = [e for e in model.config.exits if e != model.config.last_exit]
        bad = [e for e in settings.exits if e not in shallow]
        if bad:
            raise InvalidRequest(f"exits {bad} are not shallow exits of this model {shallow}")
        self.model, self.features, self.settings, self.key = model, features, settings, key
        gen = torch.Generator().manual_seed(settings.seed)
        self.loras = {
            e: LoraBranch(model.branches[e], model.geo, settings.rank, settings.alpha, gen)
            for e in settings.exits
        }
        params = [p for lora in self.loras.values() for p in lora.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
        self.heads: dict[int, torch.Tensor | None] = dict.fromkeys(settings.exits)
        if settings.bf16_head:  # one copy per distinct head (shared heads: one in all)
            copies: dict[int, torch.Tensor] = {}
            for e in settings.exits:
                head = model.branches[e].head
                self.heads[e] = copies.setdefault(head.data_ptr(), head.to(torch.bfloat16))
        self.step = 0
        self.history: list[dict[str, float]] = []  # per step: kl per exit

    def train_step(self) -> dict[str, float]:
        s = self.settings
        idx = batch_indices(len(self.features.lengths), s.batch_size, s.seed, self.step)
        batch = make_batch(self.features, idx)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, s)
        self.optimizer.zero_grad(set_to_none=True)
        record = {}
        for e, lora in self.loras.items():  # one graph at a time: memory of one exit
            loss, kl = exit_loss(
                self.model, e, lora, self.features, batch, s.ce_weight, self.heads[e]
            )
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora.parameters(), s.clip)
            record[str(e)] = float(kl)
        self.optimizer.step()
        self.step += 1
        self.history.append(record)
        return record

    # -- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "key": self.key,
            "settings": {
                k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.settings).items()
            },
            "loras": {str(e): lora.state_dict() for e, lora in self.loras.items()},
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
        }

    def save(self, out_dir: Path) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        file = Path(out_dir) / CHECKPOINT
        tmp = file.with_name(file.name + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(file)

    def restore(self, out_dir: Path) -> bool:
        """Continue from `out_dir/checkpoint.pt`; False when there is none. A checkpoint of
        another corpus or other settings is refused."""
        file = Path(out_dir) / CHECKPOINT
        if not file.is_file():
            return False
        state = torch.load(file, weights_only=True)
        mine = self.state()
        if state.get("key") != self.key or state.get("settings") != mine["settings"]:
            raise InvalidRequest(
                f"{file} was made with other data or settings ({state.get('settings')}); "
                "run without --resume to start over"
            )
        for e, lora in self.loras.items():
            lora.load_state_dict(state["loras"][str(e)])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        return True

    def run(
        self,
        out_dir: Path,
        quiet: bool = False,
        on_step: Callable[[int], None] | None = None,
    ) -> float:
        """Train to `settings.steps`, checkpointing every `checkpoint_every` steps and at the
        end. `on_step(step)` runs after each step. Returns the seconds this call trained."""
        s = self.settings
        started = time.perf_counter()
        # `initial`: a resumed run's rate and ETA count only the steps this call trains
        with progress_bar(s.steps, "train", "step", initial=self.step, disable=quiet) as bar:
            while self.step < s.steps:
                record = self.train_step()
                if self.step % s.checkpoint_every == 0 or self.step == s.steps:
                    self.save(out_dir)
                shown = {f"kl{e}": v for e, v in record.items()}
                bar.advance_to(self.step, lr=lr_at(self.step - 1, s), **shown)
                if on_step is not None:
                    on_step(self.step)
        return time.perf_counter() - started
