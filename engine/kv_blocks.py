"""Attention over a sequence's KV held as a list of blocks: the torch path, for both caches.

A paged cache (`engine.kv_pool.PagedCache`) hands each layer's K/V of one sequence out as views
of its pages, `block_size` positions each; the contiguous cache (`engine.kv_cache`) as one block
as long as its capacity. Writes land in the blocks the positions fall into; reads take a view
when the positions sit in one block (every sequence shorter than a page: nothing is copied) and
otherwise either concatenate the blocks (prefill, whose SDPA wants one tensor) or attend block by
block over views (decode: scores of every block, one softmax, then the weighted values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ruyiflow.engine.paging import cdiv


@dataclass
class BlockKV:
    """One sequence's K and V in one layer."""

    k: list[torch.Tensor]  # each [KVH, block_size, D]
    v: list[torch.Tensor]
    block_size: int


@dataclass
class LatentBlocks:
    """One sequence's MLA latent cache in one layer."""

    blocks: list[torch.Tensor]  # each [block_size, kv_lora_rank + rope]
    block_size: int


def write_positions(
    blocks: list[torch.Tensor], block_size: int, start: int, values: torch.Tensor, axis: int
) -> None:
    """Store `values` (positions along `axis`) at positions start.. of the blocks."""
    num = values.shape[axis]
    if num == 1:  # a decode row: one block, one position
        b, o = divmod(start, block_size)
        blocks[b].select(axis, o).copy_(values.select(axis, 0))
        return
    done = 0
    while done < num:
        b, o = divmod(start + done, block_size)
        take = min(block_size - o, num - done)
        blocks[b].narrow(axis, o, take).copy_(values.narrow(axis, done, take))
        done += take


def read_positions(
    blocks: list[torch.Tensor], block_size: int, end: int, axis: int
) -> torch.Tensor:
    """Positions 0..end-1 along `axis`: a view of the first block when they fit in it."""
    num_blocks = cdiv(end, block_size)
    if num_blocks == 1:
        return blocks[0].narrow(axis, 0, end)
    last = end - (num_blocks - 1) * block_size
    parts = [*blocks[: num_blocks - 1], blocks[num_blocks - 1].narrow(axis, 0, last)]
    return torch.cat(parts, dim=axis)


def key_views(blocks: list[torch.Tensor], block_size: int, end: int) -> list[torch.Tensor]:
    """Views of positions 0..end-1 of [B, block_size, ...] blocks, block by block."""
    num_blocks = cdiv(end, block_size)
    last = end - (num_blocks - 1) * block_size
    return [*blocks[: num_blocks - 1], blocks[num_blocks - 1][:, :last]]


def attend_blocks(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    scale: float,
    float_scores: bool = False,
) -> torch.Tensor:
    """Softmax attention of q [B, M, Dk] over keys [B, n_i, Dk] / values [B, n_i, Dv] given
    block by block (the same positions in each) -> [B, M, Dv]. With `float_scores` the scores and
    softmax are float32 and the weights cast back (MLA); otherwise in q's dtype."""
    if len(keys) == 1:
        scores = torch.bmm(q, keys[0].transpose(1, 2))  # [B, M, n]
    else:
        scores = torch.cat([torch.bmm(q, k.transpose(1, 2)) for k in keys], dim=-1)
    if float_scores:
        probs = (scores.float() * scale).softmax(-1).to(q.dtype)
    else:
        probs = scores.mul_(scale).softmax(-1)
    if len(values) == 1:
        return torch.bmm(probs, values[0])
    out, first = None, 0
    for v in values:
        part = probs[..., first : first + v.shape[1]]
        out = torch.bmm(part, v) if out is None else out.baddbmm_(part, v)
        first += v.shape[1]
    return out
