"""The PyTorch model runner: a loaded FamilyModel (or MoEModel) behind the `ModelRunner`
interface. One `run` packs prefill chunks and decode rows of every exit into one forward call;
`sample` applies each request's processors and draws from its own `torch.Generator`."""

from __future__ import annotations

from typing import Any

import torch

from ruyiflow.engine.batch import Work
from ruyiflow.engine.checkpoint import LoadedModel, load_model
from ruyiflow.engine.errors import HandoffError
from ruyiflow.engine.events import Confidence
from ruyiflow.engine.handoff import HandoffState, RawTensor
from ruyiflow.engine.runner import ModelRunner, pick_tokens
from ruyiflow.engine.sampling import draw, make_generator, process_row
from ruyiflow.engine.sequence import Sequence
from ruyiflow.kernels import exit_confidence

DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()} | {"U8": torch.uint8}
RNG_STATE_BYTES = torch.Generator().get_state().numel()


def to_raw(t: torch.Tensor) -> RawTensor:
    """A tensor's bytes (copied once, contiguous, little-endian as the host)."""
    flat = t.detach().contiguous().reshape(-1)
    return RawTensor(DTYPE_NAMES[t.dtype], tuple(t.shape), flat.view(torch.uint8).numpy().tobytes())


def from_raw(raw: RawTensor) -> torch.Tensor:
    """A tensor over a validated RawTensor's bytes (a copy: the payload buffer is read-only)."""
    data = bytearray(raw.data)
    if not data:
        return torch.empty(raw.shape, dtype=TORCH_DTYPES[raw.dtype])
    return torch.frombuffer(data, dtype=TORCH_DTYPES[raw.dtype]).view(raw.shape)


class TorchRunner(ModelRunner):
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.fingerprint = loaded.fingerprint
        self.state_dtype = DTYPE_NAMES[self.model.dtype]

    @classmethod
    def open(cls, source: str, dtype: str = "float32", **load_kwargs: Any) -> TorchRunner:
        return cls(load_model(source, dtype, **load_kwargs))

    def new_cache(self) -> Any:
        return self.model.new_cache()

    def new_generator(self, seed: int | None) -> tuple[torch.Generator, int]:
        return make_generator(seed)

    def run(self, works: list[Work]) -> list[torch.Tensor | None]:
        return self.model.forward(works)

    def sample(self, rows: list[tuple[Sequence, torch.Tensor]]) -> list[tuple[int, Confidence]]:
        stacked = torch.stack([lg for _, lg in rows])  # [B, V] float32
        greedy = torch.argmax(stacked, dim=-1).tolist()
        return pick_tokens(rows, greedy, exit_confidence(stacked), process_row, draw)

    def switch_exit(self, cache: Any, from_exit: int, to_exit: int) -> bool:
        self.model.switch_exit(cache, from_exit, to_exit)
        return True

    def state_tensors(self, cache: Any, exit_layer: int) -> dict[str, RawTensor]:
        t = cache.length
        tensors = {"boundary": to_raw(cache.boundary[exit_layer][:t])}
        for i in range(exit_layer):
            k, v = cache.trunk[i]
            tensors[f"trunk.{i}.k"], tensors[f"trunk.{i}.v"] = to_raw(k[:, :t]), to_raw(v[:, :t])
        return tensors

    def restore_cache(self, cache: Any, state: HandoffState, to_exit: int) -> bool:
        t, dtype = state.num_cached, self.model.dtype
        cache.reserve(t)
        for i in range(state.exit):
            k_buf, v_buf = cache.trunk_kv(i)
            k_buf[:, :t] = from_raw(state.tensors[f"trunk.{i}.k"]).to(dtype)
            v_buf[:, :t] = from_raw(state.tensors[f"trunk.{i}.v"]).to(dtype)
        cache.boundary_buf(state.exit)[:t] = from_raw(state.tensors["boundary"]).to(dtype)
        cache.length = t
        self.model.switch_exit(cache, state.exit, to_exit)
        return True

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
