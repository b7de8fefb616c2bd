"""The PyTorch model runner: a loaded FamilyModel (or MoEModel) on its device behind the
`ModelRunner` interface. It owns the paged KV pool (`engine.kv_pool`); the scheduler counts its
pages through `allocator`. One `run` packs prefill chunks and decode rows of every exit into one
forward call; `sample` applies each request's processors and draws from its own CPU
`torch.Generator` (so random states travel in handoffs whatever the device)."""

from __future__ import annotations

from typing import Any

import torch

from ruyiflow.engine.batch import Work
from ruyiflow.engine.checkpoint import LoadedModel, load_model
from ruyiflow.engine.cuda_graphs import DecodeGraphs, GraphConfig
from ruyiflow.engine.errors import HandoffError, ModelLoadError
from ruyiflow.engine.events import Confidence
from ruyiflow.engine.handoff import HandoffState, RawTensor
from ruyiflow.engine.kv_pool import (
    CPU_BLOCK_SIZE,
    CUDA_BLOCK_SIZE,
    CacheConfig,
    KVPool,
    PagedCache,
    pool_budget,
)
from ruyiflow.engine.kv_step import MIN_DEVICE_PAGE
from ruyiflow.engine.paging import OutOfBlocks
from ruyiflow.engine.runner import ModelRunner, pick_tokens
from ruyiflow.engine.sampling import draw, make_generator, process_row
from ruyiflow.engine.sequence import Sequence
from ruyiflow.kernels import exit_confidence, use_triton

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()} | {"U8": torch.uint8}
RNG_STATE_BYTES = torch.Generator().get_state().numel()


def to_raw(t: torch.Tensor) -> RawTensor:
    """A tensor's bytes (copied to the host, contiguous, little-endian as the host)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return RawTensor(DTYPE_NAMES[t.dtype], tuple(t.shape), flat.view(torch.uint8).numpy().tobytes())


def from_raw(raw: RawTensor) -> torch.Tensor:
    """A tensor over a validated RawTensor's bytes (a copy: the payload buffer is read-only)."""
    data = bytearray(raw.data)
    if not data:
        return torch.empty(raw.shape, dtype=TORCH_DTYPES[raw.dtype])
    return torch.frombuffer(data, dtype=TORCH_DTYPES[raw.dtype]).view(raw.shape)


class TorchRunner(ModelRunner):
    def __init__(
        self,
        loaded: LoadedModel,
        cache: CacheConfig | None = None,
        graphs: GraphConfig | None = None,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.fingerprint = loaded.fingerprint
        self.state_dtype = DTYPE_NAMES[self.model.dtype]
        self.device = self.model.device
        cache = cache or CacheConfig()
        self.pool: KVPool | None = None
        self.allocator = None  # no page accounting on the contiguous path
        if cache.paged:
            is_cuda = self.device.type == "cuda"
            block_size = cache.block_size or (CUDA_BLOCK_SIZE if is_cuda else CPU_BLOCK_SIZE)
            self.pool = KVPool.for_budget(
                self.model.page_geometry(block_size),
                self.model.page_layout(block_size),
                pool_budget(cache, self.device),
                self.model.dtype,
                self.device,
            )
            self.allocator = self.pool.allocator
        self.graphs = self._decode_graphs(graphs) if graphs and graphs.enabled else None

    def _decode_graphs(self, config: GraphConfig) -> DecodeGraphs:
        pool = self.pool
        if self.device.type != "cuda" or pool is None or not use_triton(pool.pages):
            raise ModelLoadError("CUDA graphs need a CUDA device, Triton and the paged cache")
        if pool.block_size < MIN_DEVICE_PAGE:
            raise ModelLoadError(f"CUDA graphs need pages of {MIN_DEVICE_PAGE}+ positions")
        return DecodeGraphs(self.model, pool, config)

    @classmethod
    def open(
        cls,
        source: str,
        dtype: str = "float32",
        cache: CacheConfig | None = None,
        graphs: GraphConfig | None = None,
        **load_kwargs: Any,
    ) -> TorchRunner:
        return cls(load_model(source, dtype, **load_kwargs), cache, graphs)

    def new_cache(self) -> PagedCache | Any:
        return self.pool.new_cache() if self.pool is not None else self.model.new_cache()

    def new_generator(self, seed: int | None) -> tuple[torch.Generator, int]:
        return make_generator(seed)

    def run(self, works: list[Work]) -> list[torch.Tensor | None]:
        if self.graphs is not None and self.graphs.applies(works):
            return self.graphs.run(works)  # a decode step at one exit: replay its graph
        return self.model.forward(works)

    def sample(self, rows: list[tuple[Sequence, torch.Tensor]]) -> list[tuple[int, Confidence]]:
        stacked = torch.stack([lg for _, lg in rows])  # [B, V] float32, on the device
        greedy = torch.argmax(stacked, dim=-1).tolist()
        confidence = tuple(c.tolist() for c in exit_confidence(stacked))  # one copy each
        rows = [(seq, row if row.is_cpu else row.cpu()) for seq, row in rows]  # CPU generators
        return pick_tokens(rows, greedy, confidence, process_row, draw)

    def switch_exit(self, cache: Any, from_exit: int, to_exit: int) -> bool:
        if to_exit < from_exit and cache.length and not cache.has_boundary(to_exit):
            return False  # its boundary states start after a hidden import: re-prefill
        try:
            self.model.switch_exit(cache, from_exit, to_exit)
        except OutOfBlocks:
            return False  # the engine re-prefills it when pages are free
        return True

    def state_tensors(self, cache: Any, exit_layer: int) -> dict[str, RawTensor]:
        """The wire layout: boundary [T, hidden] and per trunk layer K/V [KVH, T, D] (from a
        paged cache, one gather and one device-to-host copy for all layers)."""
        t = cache.length
        tensors = {"boundary": to_raw(cache.read_boundary(exit_layer, t))}
        if exit_layer:
            k, v = cache.read_trunk(exit_layer, t)
            k, v = k.cpu(), v.cpu()  # [L, KVH, T, D]
            for i in range(exit_layer):
                tensors[f"trunk.{i}.k"], tensors[f"trunk.{i}.v"] = to_raw(k[i]), to_raw(v[i])
        return tensors

    def restore_cache(self, cache: Any, state: HandoffState, to_exit: int) -> bool:
        """Writes a validated state into the cache (fresh pages when paged: OutOfBlocks, holding
        none, when the pool is short), then makes it valid at `to_exit`."""
        t, exit_layer = state.num_cached, state.exit
        try:
            if isinstance(cache, PagedCache):
                layout = cache.layout
                cache.ensure_slots([*range(exit_layer), layout.boundary_slot(exit_layer)], t)
            else:
                cache.reserve(t)
            if exit_layer:
                cache.write_trunk(self._stacked(state, "k"), self._stacked(state, "v"))
            boundary = from_raw(state.tensors["boundary"]).to(self.device, self.model.dtype)
            cache.write_boundary(exit_layer, 0, boundary)
            cache.length = t
            self.model.switch_exit(cache, exit_layer, to_exit)
        except OutOfBlocks:
            cache.release()
            raise
        if isinstance(cache, PagedCache):  # shallower exits' boundaries start at position t
            cache.stale.update(
                cache.layout.boundary_slot(e) for e in self.config.exits if e < exit_layer
            )
        return True

    def _stacked(self, state: HandoffState, kind: str) -> torch.Tensor:
        """Trunk K or V of a state as one [L, KVH, T, D] tensor on the device."""
        parts = [from_raw(state.tensors[f"trunk.{i}.{kind}"]) for i in range(state.exit)]
        return torch.stack(parts).to(self.device, self.model.dtype)

    def rng_state(self, generator: torch.Generator) -> bytes:
        return generator.get_state().numpy().tobytes()

    def restore_generator(
        self, generator: torch.Generator, rng: bytes | None, seed: int
    ) -> torch.Generator:
        if rng is None:  # none sent (an ONNX Runtime node): reseed
            generator.manual_seed(seed)
        elif len(rng) != RNG_STATE_BYTES:
            raise HandoffError(
                f"handoff state: tensor 'rng' has shape ({len(rng)},), "
                f"expected ({RNG_STATE_BYTES},)"
            )
        else:
            generator.set_state(torch.frombuffer(bytearray(rng), dtype=torch.uint8))
        return generator
