"""The engine: continuous batching of one model, the same for every runner.

A step is schedule -> run -> postprocess: the scheduler packs every running sequence's next token
and, within the step's token budget, prefill chunks of waiting ones; the model runner computes
them in one call (sequences at different exits share it); the runner samples each row and the
scheduler records the tokens. Sequences join and leave between any two steps.

Moving a request is written here once, over what a runner exposes: `switch_exit` (the runner
moves the cache, or the sequence re-prefills), and `export_state` / `import_state` in the single
wire format of `engine.handoff`.

A request added with `hold_first=True` has its first token sampled but not recorded: it waits in
`held` until the caller (a node's confidence gate) accepts it (`accept_first`, the token is
recorded and streams) or retracts it (`retract_first`: "un-sampled", the cache rewound one
position so the last prompt token is fed again - at another exit after `switch_exit`, or on
another node after `export_state`). `prompt_features` pools the prompt's boundary states.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ruyiflow.engine.batch import Work
from ruyiflow.engine.errors import HandoffError, InvalidRequest, Overloaded
from ruyiflow.engine.events import Confidence, Status, TokenEvent
from ruyiflow.engine.handoff import (
    MODES,
    HandoffState,
    ModelFacts,
    RawTensor,
    decode_state,
    encode_state,
)
from ruyiflow.engine.paging import OutOfBlocks
from ruyiflow.engine.runner import ModelRunner
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.engine.scheduler import Scheduler
from ruyiflow.engine.sequence import Sequence


@dataclass(frozen=True)
class HeldToken:
    """A request's first token, sampled at `exit` but not yet recorded (`hold_first`)."""

    seq_id: str
    token_id: int
    exit: int
    confidence: Confidence


class Engine:
    def __init__(
        self,
        model: Any,  # a ModelRunner, or an engine.checkpoint.LoadedModel (-> the torch runner)
        max_batch: int = 8,
        max_context: int | None = None,
        max_step_tokens: int = 2048,
        max_waiting: int = 256,
    ):
        if not isinstance(model, ModelRunner):
            from ruyiflow.engine.torch_runner import TorchRunner

            model = TorchRunner(model)
        self.runner = model
        self.config = model.config
        self.tokenizer = model.tokenizer
        self.fingerprint = model.fingerprint
        stop_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.config.eos_token_ids)
        self.scheduler = Scheduler(
            self.config,
            stop_ids,
            max_batch,
            max_context,
            max_step_tokens,
            max_waiting,
            getattr(model, "allocator", None),  # KV pages, when the runner's cache is paged
        )
        self.held: dict[str, HeldToken] = {}  # first tokens waiting for accept/retract
        self._hold: set[str] = set()  # sequences whose next sampled token is held

    # -- what the serving layer reads ------------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.scheduler.max_context

    @property
    def max_batch(self) -> int:
        return self.scheduler.max_batch

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self) -> Any:
        return self.scheduler.waiting

    @property
    def sequences(self) -> dict[str, Sequence]:
        return self.scheduler.sequences

    @property
    def state_dtype_bytes(self) -> int:
        return self.runner.state_dtype_bytes

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, seq_id: str) -> None:
        self._forget(seq_id)
        self.scheduler.abort(seq_id)

    def _forget(self, seq_id: str) -> None:
        self.held.pop(seq_id, None)
        self._hold.discard(seq_id)

    # -- admission ------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        exit_layer: int | None = None,
        seq_id: str | None = None,
        prefix_ids: list[int] | tuple[int, ...] = (),
        hold_first: bool = False,
    ) -> str:
        """Queue a request. `prefix_ids` are tokens already generated (and streamed) elsewhere,
        e.g. before a node failed: they are prefilled with the prompt, count towards
        `max_tokens`, and their text is not emitted again. `hold_first`: its first token waits
        in `held` (module docstring); ignored with a prefix (something already streamed)."""
        params = params or SamplingParams()
        exit_layer = self.config.default_exit if exit_layer is None else exit_layer
        self.runner.check_exit(exit_layer)
        tokens = list(prompt_ids) + list(prefix_ids)
        self.scheduler.check_prompt(tokens)
        if len(prefix_ids) >= params.max_tokens:
            raise InvalidRequest(
                f"{len(prefix_ids)} prefix tokens leave nothing of max_tokens {params.max_tokens}"
            )
        seq = self._new_sequence(seq_id, tokens, len(prompt_ids), exit_layer, params)
        _prime_text(seq, None)
        self.scheduler.admit(seq)
        if hold_first and not prefix_ids:
            self._hold.add(seq.id)
        return seq.id

    def _new_sequence(
        self,
        seq_id: str | None,
        tokens: list[int],
        num_prompt: int,
        exit_layer: int,
        params: SamplingParams,
    ) -> Sequence:
        generator, seed = self.runner.new_generator(params.seed)
        return Sequence(
            self.scheduler.new_id(seq_id),
            tokens,
            num_prompt,
            exit_layer,
            params,
            self.runner.new_cache(),
            self.tokenizer.stream(),
            self.scheduler.stop_ids_for(params),
            generator,
            seed,
        )

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        if self.held:
            raise InvalidRequest(
                f"first tokens of {sorted(self.held)} are held: accept or retract them first"
            )
        works, seqs = self.scheduler.schedule()
        if not works:
            return []
        logits = self.runner.run(works)
        rows = [(s, lg) for s, lg in zip(seqs, logits, strict=True) if lg is not None]
        if not rows:
            return []
        picks = self.runner.sample(rows)
        events = []
        for (seq, _), (token, conf) in zip(rows, picks, strict=True):
            if seq.id in self._hold:  # its first token: the caller decides (accept/retract)
                self._hold.discard(seq.id)
                self.held[seq.id] = HeldToken(seq.id, token, seq.exit, conf)
            else:
                events.append(self.scheduler.emit(seq, token, conf))
        return events

    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        exit_layer: int | None = None,
    ) -> Iterator[TokenEvent]:
        """Run one request to completion (alongside anything already in the engine)."""
        seq_id = self.add_request(prompt_ids, params, exit_layer)
        while True:
            for event in self.step():
                if event.seq_id == seq_id:
                    yield event
                    if event.finished:
                        return

    # -- held first tokens ----------------------------------------------------------------------
    def accept_first(self, seq_id: str) -> TokenEvent:
        """Record a held first token: its event, as `step` would have returned it."""
        held = self._take_held(seq_id)
        return self.scheduler.emit(self.scheduler.get(seq_id), held.token_id, held.confidence)

    def retract_first(self, seq_id: str, hold_again: bool = False) -> HeldToken:
        """Un-sample a held first token: nothing is recorded and the cache forgets the last
        prompt position, so the next step feeds the last prompt token again (at whatever exit
        the sequence is then). The sequence runs from its cached prompt: `switch_exit` keeps
        the trunk already computed, `export_state("hidden")` sends the prompt's state only.
        `hold_again`: hold the token sampled then too (a gate at the next exit)."""
        held = self._take_held(seq_id)
        seq = self.scheduler.get(seq_id)
        seq.cache.length -= 1  # positions 0..P-2 stay valid; P-1 is recomputed when fed again
        self.scheduler.start(seq)
        if hold_again:
            self._hold.add(seq_id)
        return held

    def _take_held(self, seq_id: str) -> HeldToken:
        held = self.held.pop(seq_id, None)
        if held is None:
            raise InvalidRequest(f"sequence {seq_id!r} has no held first token")
        return held

    def prompt_features(self, seq_id: str) -> np.ndarray:
        """[2 * hidden] float32: the last and the mean boundary state of the prompt at the
        sequence's exit (the input a trunk probe reads). Needs the prompt cached, e.g. while
        its first token is held. Read through the handoff layout, so every runner gives it."""
        seq = self.scheduler.get(seq_id)
        num_prompt = seq.num_prompt_tokens
        if seq.cache.length < num_prompt:
            raise InvalidRequest(f"sequence {seq_id!r} has not cached its prompt yet")
        raw = self.runner.state_tensors(seq.cache, seq.exit)["boundary"]
        boundary = _float32(raw)[:num_prompt]  # [P, hidden]
        return np.concatenate([boundary[-1], boundary.mean(axis=0)]).astype(np.float32)

    # -- moving between exits -------------------------------------------------------------------
    def switch_exit(self, seq_id: str, exit_layer: int) -> None:
        """Continue a running sequence at another exit from its next token on."""
        seq = self.scheduler.get(seq_id)
        self.runner.check_exit(exit_layer)
        self.scheduler.check_fits(seq, exit_layer)
        waiting = seq.status is Status.WAITING  # only part of the prompt is cached
        if waiting or not self.runner.switch_exit(seq.cache, seq.exit, exit_layer):
            # restart its prefill at the new exit (pages freed: recomputed when there is room)
            self.scheduler.restart(seq, self.runner.new_cache())
        seq.exit = exit_layer

    # -- handoff --------------------------------------------------------------------------------
    def export_state(self, seq_id: str, mode: str = "hidden", release: bool = True) -> bytes:
        """Serialise a sequence; by default it leaves this engine (it moves). `hidden` needs its
        prompt fully cached."""
        if mode not in MODES:
            raise InvalidRequest(f"handoff mode {mode!r} unknown (choose from {MODES})")
        seq = self.scheduler.get(seq_id)
        if mode == "hidden" and seq.status is not Status.RUNNING:
            raise InvalidRequest(f"sequence {seq_id!r} is still prefilling; use tokens mode")
        state = HandoffState(
            mode,
            self.fingerprint,
            seq.exit,
            list(seq.token_ids),
            seq.num_prompt_tokens,
            seq.params,
            seq.seed,
            seq.num_emitted_chars,
            self.runner.state_dtype,
            self.runner.state_tensors(seq.cache, seq.exit) if mode == "hidden" else {},
            self.runner.rng_state(seq.generator),
        )
        data = encode_state(state)
        if release:
            self._forget(seq_id)
            self.scheduler.release(seq)
        return data

    def import_state(
        self,
        data: bytes,
        exit_layer: int | None = None,
        seq_id: str | None = None,
        hold_first: bool = False,
    ) -> str:
        """Resume an exported sequence here, at its exit or (hidden mode) a deeper one.
        `hold_first` holds its first token when it has generated none yet."""
        state = decode_state(data, self.model_facts())
        target = state.exit if exit_layer is None else exit_layer
        self.runner.check_exit(target)
        if state.mode == "hidden" and target < state.exit:
            raise HandoffError(
                f"a hidden-state handoff from exit {state.exit} can only resume at that exit or"
                f" deeper (asked {target}); use tokens mode"
            )
        seq = self._new_sequence(
            seq_id, state.token_ids, state.num_prompt_tokens, target, state.params
        )
        seq.generator = self.runner.restore_generator(seq.generator, state.rng, state.seed)
        seq.seed = state.seed
        _prime_text(seq, state.num_emitted_chars)
        self.scheduler.check_fits(seq, target)
        try:
            if state.mode == "hidden" and not self.runner.restore_cache(seq.cache, state, target):
                seq.cache = self.runner.new_cache()  # this runner re-prefills from the tokens
        except OutOfBlocks:
            raise Overloaded("no free KV pages for the handoff's state now") from None
        self.scheduler.admit(seq)
        if hold_first and seq.num_generated == 0:
            self._hold.add(seq.id)
        return seq.id

    def model_facts(self) -> ModelFacts:
        c = self.config
        return ModelFacts(
            self.fingerprint,
            tuple(c.exits),
            c.vocab_size,
            self.max_context,
            c.hidden_size,
            c.num_kv_heads,
            c.head_dim,
        )

    def max_state_bytes(self, max_context: int) -> int:
        """Largest valid handoff state: boundary + every trunk layer's KV for max_context."""
        c = self.config
        per_token = c.hidden_size + 2 * (c.num_layers - 1) * c.num_kv_heads * c.head_dim
        return per_token * max_context * self.state_dtype_bytes + (1 << 20)

    def measure_prefill(self, exit_layer: int, num_tokens: int = 128) -> float:
        """Prefill tokens/s at `exit_layer` (also warms the runner up): best of three."""
        ids = [(37 * i) % (self.config.vocab_size - 1) + 1 for i in range(num_tokens)]
        best = float("inf")
        for _ in range(3):  # the first run pays for allocation; keep the best of the rest
            cache = self.runner.new_cache()
            started = time.perf_counter()
            self.runner.run([Work(cache, ids, 0, exit_layer)])
            best = min(best, time.perf_counter() - started)
            if hasattr(cache, "release"):
                cache.release()  # its KV pages go back to the pool
        return num_tokens / best


def _float32(raw: RawTensor) -> np.ndarray:
    """A raw F32 / F16 / BF16 tensor as float32 numpy, in its shape."""
    if raw.dtype == "BF16":  # the high half of a float32
        bits = np.frombuffer(raw.data, dtype="<u2").astype(np.uint32) << 16
        values = bits.view(np.float32)
    else:
        values = np.frombuffer(raw.data, dtype="<f4" if raw.dtype == "F32" else "<f2")
    return values.astype(np.float32).reshape(raw.shape)


def _prime_text(seq: Sequence, num_emitted: int | None) -> None:
    """Replay already generated tokens into the stream decoder; their text counts as emitted
    (all of it, or `num_emitted` chars when the sender says so)."""
    for token in seq.generated_ids:
        seq.text += seq.stream.push(token)
    seq.num_emitted_chars = (
        len(seq.text) if num_emitted is None else min(num_emitted, len(seq.text))
    )
