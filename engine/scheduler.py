"""The backend-independent half of an engine (torch-free): admission, the waiting and running
queues, per-token bookkeeping (stops, length, confidence events) and release. `engine.engine.
Engine` (PyTorch) and `engine.ort_engine.OrtEngine` (ONNX Runtime) add the forward pass, caches,
sampling and handoff export on top, so both behave the same to the serving layer."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from ruyiflow.engine.errors import InvalidRequest, Overloaded
from ruyiflow.engine.events import Confidence, Status, TokenEvent
from ruyiflow.engine.handoff_meta import MODES
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.engine.sequence import Sequence


class Scheduler:
    """Subclasses set `config` and `tokenizer` and implement `_new_cache`, `_new_generator` and
    `step`."""

    config: Any  # engine.config.ModelConfig (or the ONNX export's equivalent)
    tokenizer: Any  # engine.tokenizer.Tokenizer

    def _init_queues(
        self, max_batch: int, max_context: int | None, max_step_tokens: int, max_waiting: int
    ) -> None:
        self.max_batch = max_batch
        limit = self.config.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        self.max_step_tokens = max_step_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.stop_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(
            self.config.eos_token_ids
        )

    def _new_cache(self) -> Any:
        raise NotImplementedError

    def _new_generator(self, seed: int | None) -> tuple[Any, int]:
        raise NotImplementedError

    def step(self) -> list[TokenEvent]:
        raise NotImplementedError

    # -- admission ------------------------------------------------------------------------------
    def add_request(
        self,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        exit_layer: int | None = None,
        seq_id: str | None = None,
        prefix_ids: list[int] | tuple[int, ...] = (),
    ) -> str:
        """Queue a request. `prefix_ids` are tokens already generated (and streamed) elsewhere,
        e.g. before a node failed: they are prefilled with the prompt, count towards
        `max_tokens`, and their text is not emitted again."""
        params = params or SamplingParams()
        exit_layer = self.config.default_exit if exit_layer is None else exit_layer
        self.config.check_exit(exit_layer)
        self._check_prompt(list(prompt_ids) + list(prefix_ids))
        if len(prefix_ids) >= params.max_tokens:
            raise InvalidRequest(
                f"{len(prefix_ids)} prefix tokens leave nothing of max_tokens {params.max_tokens}"
            )
        tokens = list(prompt_ids) + list(prefix_ids)
        seq = self._new_sequence(seq_id, tokens, len(prompt_ids), exit_layer, params)
        self._prime_text(seq, None)
        self._admit(seq)
        return seq.id

    @staticmethod
    def _prime_text(seq: Sequence, num_emitted: int | None) -> None:
        """Replay already generated tokens into the stream decoder; their text counts as
        emitted (all of it, or `num_emitted` chars when the sender says so)."""
        for token in seq.generated_ids:
            seq.text += seq.stream.push(token)
        seq.num_emitted_chars = (
            len(seq.text) if num_emitted is None else min(num_emitted, len(seq.text))
        )

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise InvalidRequest(
                f"prompt of {len(prompt_ids)} tokens exceeds the context length {self.max_context}"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise InvalidRequest(
                f"token ids {bad[:5]} outside the vocabulary 0..{self.config.vocab_size - 1}"
            )

    def _new_sequence(
        self,
        seq_id: str | None,
        tokens: list[int],
        num_prompt: int,
        exit_layer: int,
        params: SamplingParams,
    ) -> Sequence:
        seq_id = seq_id or f"seq-{next(self._ids)}"
        if seq_id in self.sequences:
            raise InvalidRequest(f"sequence id {seq_id!r} already in use")
        stop_ids = frozenset(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.stop_ids
        generator, seed = self._new_generator(params.seed)
        return Sequence(
            seq_id,
            tokens,
            num_prompt,
            exit_layer,
            params,
            self._new_cache(),
            self.tokenizer.stream(),
            stop_ids,
            generator,
            seed,
        )

    def _admit(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"{len(self.waiting)} requests already waiting")
        self.sequences[seq.id] = seq
        if seq.pending_tokens() and seq.cache.length < len(seq.token_ids) - 1:
            self.waiting.append(seq)
        else:
            seq.status = Status.RUNNING
            self.running.append(seq)

    def abort(self, seq_id: str) -> None:
        seq = self.sequences.get(seq_id)
        if seq is not None and seq.status is not Status.FINISHED:
            seq.finish("abort")
            self._release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _exportable(self, seq_id: str, mode: str) -> Sequence:
        """The sequence to export in `mode` (hidden needs its prompt fully cached)."""
        if mode not in MODES:
            raise InvalidRequest(f"handoff mode {mode!r} unknown (choose from {MODES})")
        seq = self._get(seq_id)
        if mode == "hidden" and seq.status is not Status.RUNNING:
            raise InvalidRequest(f"sequence {seq_id!r} is still prefilling; use tokens mode")
        return seq

    state_dtype_bytes: int  # bytes per element of exported hidden states and KV

    def max_state_bytes(self, max_context: int) -> int:
        """Largest valid handoff state: boundary + every trunk layer's KV for max_context."""
        c = self.config
        per_token = c.hidden_size + 2 * (c.num_layers - 1) * c.num_kv_heads * c.head_dim
        return per_token * max_context * self.state_dtype_bytes + (1 << 20)

    def measure_prefill(self, exit_layer: int, num_tokens: int = 128) -> float:
        """Prefill tokens/s at `exit_layer` (also warms the backend up): best of three."""
        ids = [(37 * i) % (self.config.vocab_size - 1) + 1 for i in range(num_tokens)]
        best = float("inf")
        for _ in range(3):  # the first run pays for allocation; keep the best of the rest
            started = time.perf_counter()
            self._prefill_once(exit_layer, ids)
            best = min(best, time.perf_counter() - started)
        return num_tokens / best

    def _prefill_once(self, exit_layer: int, ids: list[int]) -> None:
        """Prefill `ids` into a fresh cache at `exit_layer` (the measurement's unit of work)."""
        raise NotImplementedError

    def _emit(self, seq: Sequence, token: int, conf: Confidence) -> TokenEvent:
        """Record `token` for `seq` (its logits just came out of the model) -> its event."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
        text = seq.append(token)
        if seq.finish_reason is None:
            if seq.num_generated >= seq.params.max_tokens:
                text += seq.finish("length")
            elif len(seq.token_ids) >= self.max_context:
                text += seq.finish("length")
        event = TokenEvent(seq.id, token, text, seq.exit, conf, seq.finish_reason)
        if seq.finish_reason is not None:
            self._release(seq)
        return event

    def _release(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.sequences.pop(seq.id, None)

    def _get(self, seq_id: str) -> Sequence:
        seq = self.sequences.get(seq_id)
        if seq is None:
            raise InvalidRequest(f"no running sequence {seq_id!r}")
        return seq

    # -- convenience ----------------------------------------------------------------------------
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
