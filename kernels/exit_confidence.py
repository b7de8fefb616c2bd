"""Exit confidence of next-token logits: max probability, top-2 margin and entropy, per row.

For logits [B, V] (any float dtype) returns three float32 [B] tensors, computed in float32:

    p1      = max softmax probability
    margin  = p1 - p2 (p2 the second largest probability; 0 when V == 1)
    entropy = -sum p log p (natural log)

Masked entries (-inf) carry probability 0 and add nothing; a row with no finite logit gives
(0, 0, 0). The kernel makes one pass over the vocabulary and never materialises probabilities:
per lane it keeps a running max m, s = sum exp(x - m), u = sum (x - m) exp(x - m) and the two
largest values, rescaling s and u when m grows; lanes are merged once at the end and
entropy = log S - U / S.
"""

from __future__ import annotations

from typing import Any

import torch

from ruyiflow.kernels.dispatch import check_launchable, next_power_of_2, triton_jit

# triton.language, bound by @triton_jit on the first launch (triton is imported lazily).
tl: Any = None

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# exp(x) underflows to 0 in float32 below about -104: clamping (x - max) there changes no
# probability, but turns -inf (masked) into a finite number so that 0 * (x - max) stays 0.
_LOG_UNDERFLOW = -200.0


@triton_jit
def exit_confidence_kernel(
    logits_ptr,  # [B, V], unit stride along V
    p1_ptr,  # [B] float32
    margin_ptr,  # [B] float32
    entropy_ptr,  # [B] float32
    V,
    stride_row,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    lane = tl.arange(0, BLOCK_V)
    neg_inf = float("-inf")
    m = tl.full([BLOCK_V], neg_inf, tl.float32)  # per-lane max (= per-lane top-1)
    t2 = tl.full([BLOCK_V], neg_inf, tl.float32)  # per-lane second largest
    s = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane sum exp(x - m)
    u = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane sum (x - m) exp(x - m)
    for start in range(0, V, BLOCK_V):
        offs = start + lane
        x = tl.load(base + offs, mask=offs < V, other=neg_inf).to(tl.float32)
        m_new = tl.maximum(m, x)
        # A lane that has only seen -inf keeps s = u = 0; shift by 0 there to avoid inf - inf.
        m_ref = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        beta = tl.exp(x - m_ref)
        dm = tl.where(m == neg_inf, 0.0, m - m_ref)
        dx = tl.where(x == neg_inf, 0.0, x - m_ref)
        u = (u + dm * s) * alpha + dx * beta
        s = s * alpha + beta
        t2 = tl.maximum(t2, tl.minimum(m, x))
        m = m_new
    top1 = tl.max(m, axis=0)
    top1_ref = tl.where(top1 == neg_inf, 0.0, top1)
    alpha = tl.exp(m - top1_ref)
    dm = tl.where(m == neg_inf, 0.0, m - top1_ref)
    total = tl.sum(s * alpha, axis=0)
    u_total = tl.sum((u + dm * s) * alpha, axis=0)
    # Second largest overall: the best of the other lanes' maxima and every lane's runner-up.
    first = tl.argmax(m, axis=0)
    top2 = tl.maximum(tl.max(tl.where(lane == first, neg_inf, m), axis=0), tl.max(t2, axis=0))
    has_mass = total > 0.0
    total_safe = tl.where(has_mass, total, 1.0)
    p1 = tl.where(has_mass, 1.0 / total_safe, 0.0)  # exp(top1 - top1) / S
    p2 = tl.exp(top2 - top1_ref) / total_safe
    entropy = tl.where(has_mass, tl.log(total_safe) - u_total / total_safe, 0.0)
    tl.store(p1_ptr + row, p1)
    tl.store(margin_ptr + row, p1 - p2)
    tl.store(entropy_ptr + row, entropy)


def exit_confidence(
    logits: torch.Tensor, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher: `(p1, margin, entropy)`, float32 [B] each, for logits [B, V].

    `block_size` (a power of two >= 16) overrides the vocabulary chunk, for tests.
    """
    _check(logits, block_size)
    num_rows, vocab = logits.shape
    p1, margin, entropy = (
        torch.empty(num_rows, dtype=torch.float32, device=logits.device) for _ in range(3)
    )
    if num_rows == 0:
        return p1, margin, entropy
    block_v = block_size or min(next_power_of_2(vocab), 2048)
    exit_confidence_kernel[(num_rows,)](
        logits,
        p1,
        margin,
        entropy,
        vocab,
        logits.stride(0),
        BLOCK_V=block_v,
        num_warps=8 if block_v >= 2048 else 4,
    )
    return p1, margin, entropy


def _check(logits: torch.Tensor, block_size: int | None) -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError("exit_confidence: logits must be a torch tensor")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(
            f"exit_confidence: logits must be [B, V] with V >= 1, got {tuple(logits.shape)}"
        )
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"exit_confidence: logits dtype {logits.dtype} is not float32/16/bf16")
    if logits.stride(1) != 1:
        raise ValueError("exit_confidence: logits must have unit stride along the vocabulary")
    if block_size is not None and (block_size < 16 or block_size & (block_size - 1)):
        raise ValueError(f"exit_confidence: block_size {block_size} is not a power of two >= 16")
    check_launchable("exit_confidence", logits)


def exit_confidence_reference(
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain torch, vectorised over rows; materialises the probabilities [B, V].

    Built from the reductions that are fast on a CPU (`softmax`, `amax`): `topk`, `max` with
    indices and boolean masks over a 150k vocabulary each cost more than the softmax itself.
    """
    x = logits.to(torch.float32)  # [B, V]
    top1, top2 = _top2(x)  # [B] each
    has_mass = top1 > float("-inf")  # rows with a finite logit
    top1_ref = torch.where(has_mass, top1, 0.0)[:, None]  # [B, 1]
    probs = torch.softmax(x, dim=-1)  # [B, V]; NaN in rows without mass, zeroed below
    p1 = probs.amax(-1)  # = 1 / sum exp(x - top1)
    p2 = (top2 - top1_ref[:, 0]).exp() * p1
    # log S - sum p (x - top1), with (x - top1) = log p + log S; in place: one [B, V] buffer.
    shifted = (x - top1_ref).clamp_min_(_LOG_UNDERFLOW)
    entropy = -p1.log() - shifted.mul_(probs).sum(-1)
    zero = torch.zeros_like(p1)
    return (
        torch.where(has_mass, p1, zero),
        torch.where(has_mass, p1 - p2, zero),
        torch.where(has_mass, entropy, zero),
    )


def _top2(x: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The two largest values of each row of x [B, V] (equal when the largest is tied).

    One fast `amax` over chunks of the row, then `topk` only on small tensors: the runner-up
    is the best of the other chunks' maxima, the winning chunk's second and the ragged tail.
    """
    num_rows, vocab = x.shape
    head = vocab // chunk * chunk
    if head == 0:
        top = x.topk(min(2, vocab), dim=-1).values  # [B, 1 or 2]
    else:
        chunks = x[:, :head].view(num_rows, head // chunk, chunk)  # [B, C, chunk]
        chunk_max = chunks.amax(-1)  # [B, C]
        best = chunk_max.argmax(-1, keepdim=True)  # [B, 1]
        in_best = chunks[torch.arange(num_rows, device=x.device), best[:, 0]]  # [B, chunk]
        others = chunk_max.scatter(1, best, float("-inf"))
        candidates = torch.cat([others, in_best.topk(2, dim=-1).values, x[:, head:]], dim=1)
        top = candidates.topk(2, dim=-1).values
    if top.shape[1] == 1:  # V == 1: there is no runner-up
        return top[:, 0], torch.full_like(top[:, 0], float("-inf"))
    return top[:, 0], top[:, 1]
