"""CUDA graphs of decode steps: one graph per (exit, batch-size bucket), replayed instead of
launching a step's few hundred kernels one by one.

A step qualifies when every work item decodes one token at one exit, on the device path, with at
most the largest bucket of rows; its rows are padded to the next bucket. Padding rows read and
write a scratch row of the device block table whose every entry is page 0, the page the
allocator never hands out. Each graph replays `model.run_layers` over static inputs (token ids,
positions, table rows, lengths: one upload per step); anything else runs eagerly. Graphs are
captured on first use, share one memory pool, and are dropped when the device block table or
the RoPE table they read is replaced by a larger one.

OFF by default (`GraphConfig.enabled`): graph decode must first be verified against eager
decode, token for token, on a device (`pytest -m gpu`, run by `ruyiflow bench gpu`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ruyiflow.engine.attention import Segment
from ruyiflow.engine.batch import Work
from ruyiflow.engine.device_kv import DeviceStep
from ruyiflow.engine.kv_pool import KVPool

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


@dataclass(frozen=True)
class GraphConfig:
    enabled: bool = False
    buckets: tuple[int, ...] = BUCKETS
    max_context: int = 8192  # RoPE rows and table width reserved up front (no recapture)

    def __post_init__(self) -> None:
        ordered = list(self.buckets) == sorted(set(self.buckets))
        if not self.buckets or not ordered or self.buckets[0] < 1:
            raise ValueError(f"buckets must be increasing sizes >= 1, got {self.buckets}")


class DecodeGraphs:
    def __init__(self, model: Any, pool: KVPool, config: GraphConfig):
        self.model, self.pool, self.config = model, pool, config
        self.tables = pool.device_tables()
        self.scratch_row = pool.allocator.take_row()  # all zeros: every slot at page 0
        width = -(-config.max_context // min(pool.layout.block_size, _boundary_size(pool)))
        self.tables.reserve(self.scratch_row + 1 + 2 * config.buckets[-1], width)
        model.rope.reserve(config.max_context)
        # static inputs, [4, max bucket] int64: token ids, positions, table rows, lengths
        self.inputs = torch.zeros(4, config.buckets[-1], dtype=torch.int64, device=pool.device)
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self.memory_pool: Any = None  # one pool for every graph, made at the first capture
        self._key = self._inputs_key()
        self.num_replays = 0

    def _inputs_key(self) -> tuple[int, int]:
        return self.tables.version, self.model.rope.cos.data_ptr()

    def applies(self, works: list[Work]) -> bool:
        first = works[0]
        return (
            len(works) <= self.config.buckets[-1]
            and all(len(w.token_ids) == 1 and w.want_logits for w in works)
            and all(w.exit == first.exit for w in works)
            and all(w.start < self.config.max_context for w in works)
        )

    def run(self, works: list[Work]) -> list[torch.Tensor]:
        """Logits [vocab] of each decode row (views into the graph's output: read them before
        the next step)."""
        rows = self.tables.sync([w.cache for w in works])
        if self._inputs_key() != self._key:  # a table was replaced: graphs read the old one
            self.graphs.clear()
            self._key = self._inputs_key()
        num = len(works)
        bucket = next(b for b in self.config.buckets if b >= num)
        pad = bucket - num
        host = torch.tensor(
            [
                [w.token_ids[0] for w in works] + [0] * pad,
                [w.start for w in works] + [0] * pad,
                rows + [self.scratch_row] * pad,
                [w.start + 1 for w in works] + [1] * pad,
            ],
            dtype=torch.int64,
        )
        graph, out = self._graph(works[0].exit, bucket)  # (a capture fills the inputs first)
        self.inputs[:, :bucket].copy_(host, non_blocking=True)
        graph.replay()
        self.num_replays += 1
        for w in works:
            w.cache.length = w.start + 1
        return list(out[:num].unbind(0))

    def _graph(self, exit_layer: int, bucket: int) -> tuple[Any, torch.Tensor]:
        """The graph of (exit, bucket) and its output [bucket, vocab], captured on first use."""
        key = (exit_layer, bucket)
        if key not in self.graphs:
            self._scratch_inputs(bucket)
            if self.memory_pool is None:
                self.memory_pool = torch.cuda.graph_pool_handle()
            stream = torch.cuda.Stream(self.pool.device)
            stream.wait_stream(torch.cuda.current_stream(self.pool.device))
            with torch.cuda.stream(stream):  # warm up: Triton compiles, cuBLAS picks kernels
                for _ in range(2):
                    self._body(exit_layer, bucket)
            torch.cuda.current_stream(self.pool.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.memory_pool):
                out = self._body(exit_layer, bucket)
            self.graphs[key] = (graph, out)
        return self.graphs[key]

    def _scratch_inputs(self, bucket: int) -> None:
        """Point every row at the scratch row (what warm-up and capture write goes to page 0)."""
        scratch = torch.tensor([0, 0, self.scratch_row, 1]).to(self.inputs)
        self.inputs[:, :bucket] = scratch[:, None]

    @torch.inference_mode()
    def _body(self, exit_layer: int, bucket: int) -> torch.Tensor:
        """One decode step of `bucket` rows at `exit_layer` over the static inputs -> logits
        [bucket, vocab] float32."""
        ids, positions, rows, lengths = self.inputs[:, :bucket].unbind(0)
        lengths = lengths.to(torch.int32)
        segments = [Segment(k, 1, 0) for k in range(bucket)]
        step = DeviceStep(self.pool, segments, rows, positions, rows, lengths)
        model = self.model
        h = F.embedding(ids, model.embed)
        cos, sin = model.rope.cos[positions], model.rope.sin[positions]
        exits, wanted = [exit_layer] * bucket, [True] * bucket
        return torch.stack(model.run_layers(h, cos, sin, segments, exits, wanted, step))


def _boundary_size(pool: KVPool) -> int:
    return pool.layout.boundary_block_size or pool.layout.block_size
