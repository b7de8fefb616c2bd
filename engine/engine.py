"""The engine: continuous batching over a FamilyModel.

A step is schedule -> run -> postprocess. Scheduling packs every running sequence's next token
and, within the step's token budget, prefill chunks of waiting ones into one forward call, so
sequences join and leave between any two steps. Sequences at different exits share the call.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator

import torch

from engine.checkpoint import LoadedModel
from engine.errors import HandoffError, InvalidRequest, Overloaded
from engine.handoff import MODES, HandoffState, decode_state, encode_state
from engine.model import Work
from engine.sampling import SamplingParams, draw, make_generator, process_row
from engine.sequence import Confidence, Sequence, Status, TokenEvent
from kernels import exit_confidence


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        max_batch: int = 8,
        max_context: int | None = None,
        max_step_tokens: int = 2048,
        max_waiting: int = 256,
    ):
        self.loaded = loaded
        self.model = loaded.model
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
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
        generator, seed = make_generator(params.seed)
        return Sequence(
            seq_id,
            tokens,
            num_prompt,
            exit_layer,
            params,
            self.model.new_cache(),
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

    # -- one step -------------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        works, seqs = self._schedule()
        if not works:
            return []
        logits = self.model.forward(works)
        return self._postprocess(seqs, logits)

    def _schedule(self) -> tuple[list[Work], list[Sequence]]:
        works, seqs = [], []
        budget = self.max_step_tokens
        for seq in self.running:
            works.append(Work(seq.cache, seq.pending_tokens(), seq.cache.length, seq.exit))
            seqs.append(seq)
            budget -= 1
        # Waiting sequences prefill in chunks; one becomes running once its prompt is cached.
        for seq in list(self.waiting):
            if budget <= 0 or len(seqs) >= self.max_batch:
                break
            pending = seq.pending_tokens()
            chunk = pending[:budget]
            works.append(
                Work(
                    seq.cache,
                    chunk,
                    seq.cache.length,
                    seq.exit,
                    want_logits=len(chunk) == len(pending),
                )
            )
            seqs.append(seq)
            budget -= len(chunk)
        return works, seqs

    def _postprocess(
        self, seqs: list[Sequence], logits: list[torch.Tensor | None]
    ) -> list[TokenEvent]:
        rows = [(s, lg) for s, lg in zip(seqs, logits, strict=True) if lg is not None]
        if not rows:
            return []
        stacked = torch.stack([lg for _, lg in rows])  # [B, V] float32
        max_prob, margin, entropy = exit_confidence(stacked)
        greedy = torch.argmax(stacked, dim=-1).tolist()
        events = []
        for k, (seq, row) in enumerate(rows):
            if seq.status is Status.WAITING:
                self.waiting.remove(seq)
                seq.status = Status.RUNNING
                self.running.append(seq)
            if seq.params.needs_row_processing:
                token = draw(
                    process_row(row, seq.params, seq.token_ids, seq.ngrams),
                    seq.params,
                    seq.generator,
                )
            else:
                token = greedy[k]
            text = seq.append(token)
            if seq.finish_reason is None:
                if seq.num_generated >= seq.params.max_tokens:
                    text += seq.finish("length")
                elif len(seq.token_ids) >= self.max_context:
                    text += seq.finish("length")
            conf = Confidence(float(max_prob[k]), float(margin[k]), float(entropy[k]))
            events.append(TokenEvent(seq.id, token, text, seq.exit, conf, seq.finish_reason))
            if seq.finish_reason is not None:
                self._release(seq)
        return events

    def _release(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.sequences.pop(seq.id, None)

    # -- moving between exits -------------------------------------------------------------------
    def switch_exit(self, seq_id: str, exit_layer: int) -> None:
        """Continue a running sequence at another exit from its next token on."""
        seq = self._get(seq_id)
        self.config.check_exit(exit_layer)
        if seq.status is Status.WAITING:  # only part of the prompt is cached: restart its prefill
            seq.cache = self.model.new_cache()
        else:
            self.model.switch_exit(seq.cache, seq.exit, exit_layer)
        seq.exit = exit_layer

    # -- handoff ------------------------------------------------------------------------------
    def export_state(self, seq_id: str, mode: str = "hidden", release: bool = True) -> bytes:
        """Serialise a running sequence; by default it leaves this engine (it moves)."""
        if mode not in MODES:
            raise InvalidRequest(f"handoff mode {mode!r} unknown (choose from {MODES})")
        seq = self._get(seq_id)
        if mode == "hidden" and seq.status is not Status.RUNNING:
            raise InvalidRequest(f"sequence {seq_id!r} is still prefilling; use tokens mode")
        t = seq.cache.length
        state = HandoffState(
            mode=mode,
            fingerprint=self.loaded.fingerprint,
            exit=seq.exit,
            token_ids=list(seq.token_ids),
            num_prompt_tokens=seq.num_prompt_tokens,
            params=seq.params,
            seed=seq.seed,
            num_emitted_chars=seq.num_emitted_chars,
            rng=seq.generator.get_state(),
            boundary=None,
            trunk_kv=[],
        )
        if mode == "hidden":
            state.boundary = seq.cache.boundary[seq.exit][:t]
            state.trunk_kv = [
                (k[:, :t], v[:, :t]) for k, v in (seq.cache.trunk[i] for i in range(seq.exit))
            ]
        data = encode_state(state, self.model.dtype)
        if release:
            self._release(seq)
        return data

    def import_state(
        self, data: bytes, exit_layer: int | None = None, seq_id: str | None = None
    ) -> str:
        """Resume an exported sequence here, at its exit or (hidden mode) a deeper one."""
        c = self.config
        state = decode_state(
            data,
            fingerprint=self.loaded.fingerprint,
            exits=c.exits,
            vocab_size=c.vocab_size,
            max_context=self.max_context,
            hidden_size=c.hidden_size,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
        )
        target = state.exit if exit_layer is None else exit_layer
        c.check_exit(target)
        if state.mode == "hidden" and target < state.exit:
            raise HandoffError(
                f"a hidden-state handoff from exit {state.exit} can only resume at that exit or"
                f" deeper (asked {target}); use tokens mode"
            )
        seq = self._new_sequence(
            seq_id, state.token_ids, state.num_prompt_tokens, target, state.params
        )
        if state.rng is not None:
            seq.generator.set_state(state.rng)
        else:
            seq.generator.manual_seed(state.seed)
        seq.seed = state.seed
        self._prime_text(seq, state.num_emitted_chars)
        if state.mode == "hidden":
            self._restore_cache(seq, state)
        self._admit(seq)
        return seq.id

    def _restore_cache(self, seq: Sequence, state: HandoffState) -> None:
        cache, t, dtype = seq.cache, state.num_cached, self.model.dtype
        cache.reserve(t)
        for i, (k, v) in enumerate(state.trunk_kv):
            k_buf, v_buf = cache.trunk_kv(i)
            k_buf[:, :t] = k.to(dtype)
            v_buf[:, :t] = v.to(dtype)
        cache.boundary_buf(state.exit)[:t] = state.boundary.to(dtype)
        cache.length = t
        self.model.switch_exit(cache, state.exit, seq.exit)

    def _get(self, seq_id: str) -> Sequence:
        seq = self.sequences.get(seq_id)
        if seq is None:
            raise InvalidRequest(f"no running sequence {seq_id!r}")
        return seq

    # -- facts for the serving layer -------------------------------------------------------------
    @property
    def state_dtype_bytes(self) -> int:
        """Bytes per element of exported hidden states and KV."""
        return self.model.embed.element_size()

    def max_state_bytes(self, max_context: int) -> int:
        """Largest valid handoff state: boundary + every trunk layer's KV for max_context."""
        c = self.config
        per_token = c.hidden_size + 2 * (c.num_layers - 1) * c.num_kv_heads * c.head_dim
        return per_token * max_context * self.state_dtype_bytes + (1 << 20)

    def measure_prefill(self, exit_layer: int, num_tokens: int = 128) -> float:
        """Prefill tokens/s at `exit_layer` (also warms the allocator and kernels up)."""
        ids = [(37 * i) % (self.config.vocab_size - 1) + 1 for i in range(num_tokens)]
        best = float("inf")
        for _ in range(3):  # the first run pays for allocation; keep the best of the rest
            started = time.perf_counter()
            self.model.forward([Work(self.model.new_cache(), ids, 0, exit_layer)])
            best = min(best, time.perf_counter() - started)
        return num_tokens / best

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
