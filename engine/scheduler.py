"""The scheduler: admission, the waiting and running queues, the batch of each step, and
per-token bookkeeping (stops, length, release). Pure Python: it never touches a tensor; the
model runner computes what `schedule` picks and the engine hands the sampled tokens back to
`emit`.

Batching policy (one, for every runner): every running sequence decodes its next token; then,
within the step's token budget and `max_batch` rows, waiting sequences prefill in chunks, oldest
first. A waiting sequence becomes running once its prompt is cached and its first token sampled.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

from ruyiflow.engine.batch import Work
from ruyiflow.engine.errors import InvalidRequest, Overloaded
from ruyiflow.engine.events import Confidence, Status, TokenEvent
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.engine.sequence import Sequence


class Scheduler:
    def __init__(
        self,
        config: Any,  # the runner's model facts (vocab_size, max_position_embeddings, ...)
        stop_ids: frozenset[int],
        max_batch: int = 8,
        max_context: int | None = None,
        max_step_tokens: int = 2048,
        max_waiting: int = 256,
    ):
        if max_batch < 1 or max_step_tokens < 1 or max_waiting < 0:
            raise InvalidRequest("max_batch and max_step_tokens must be >= 1, max_waiting >= 0")
        self.config = config
        self.stop_ids = stop_ids
        self.max_batch = max_batch
        limit = config.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        self.max_step_tokens = max_step_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}
        self._ids = itertools.count()

    # -- admission ------------------------------------------------------------------------------
    def check_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequest("prompt is empty")
        if len(token_ids) >= self.max_context:
            raise InvalidRequest(
                f"prompt of {len(token_ids)} tokens exceeds the context length {self.max_context}"
            )
        vocab = self.config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} outside the vocabulary 0..{vocab - 1}")

    def new_id(self, seq_id: str | None) -> str:
        seq_id = seq_id or f"seq-{next(self._ids)}"
        if seq_id in self.sequences:
            raise InvalidRequest(f"sequence id {seq_id!r} already in use")
        return seq_id

    def stop_ids_for(self, params: SamplingParams) -> frozenset[int]:
        stop_ids = frozenset(params.stop_token_ids)
        return stop_ids if params.ignore_eos else stop_ids | self.stop_ids

    def admit(self, seq: Sequence) -> None:
        """Queue `seq`: waiting while tokens are left to prefill, else running."""
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"{len(self.waiting)} requests already waiting")
        self.sequences[seq.id] = seq
        if seq.pending_tokens() and seq.cache.length < len(seq.token_ids) - 1:
            self.waiting.append(seq)
        else:
            seq.status = Status.RUNNING
            self.running.append(seq)

    def start(self, seq: Sequence) -> None:
        """A waiting sequence whose cache holds all its tokens but the last runs from the next
        step (as after sampling its first token)."""
        if seq.status is Status.WAITING and seq.cache.length == len(seq.token_ids) - 1:
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """Send a running sequence back to prefill (its cache was replaced), first in line."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, seq_id: str) -> Sequence:
        seq = self.sequences.get(seq_id)
        if seq is None:
            raise InvalidRequest(f"no running sequence {seq_id!r}")
        return seq

    # -- one step -------------------------------------------------------------------------------
    def schedule(self) -> tuple[list[Work], list[Sequence]]:
        """The work of the next step and the sequence of each item."""
        works, seqs = [], []
        budget = self.max_step_tokens
        for seq in self.running:
            works.append(Work(seq.cache, seq.pending_tokens(), seq.cache.length, seq.exit))
            seqs.append(seq)
            budget -= 1
        for seq in list(self.waiting):
            if budget <= 0 or len(seqs) >= self.max_batch:
                break
            pending = seq.pending_tokens()
            chunk = pending[:budget]
            last = len(chunk) == len(pending)  # the prompt's end: sample its first token
            works.append(Work(seq.cache, chunk, seq.cache.length, seq.exit, want_logits=last))
            seqs.append(seq)
            budget -= len(chunk)
        return works, seqs

    def emit(self, seq: Sequence, token: int, conf: Confidence) -> TokenEvent:
        """Record `token` for `seq` (its logits just came out of the model) -> its event."""
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
        text = seq.append(token)
        if seq.finish_reason is None and (
            seq.num_generated >= seq.params.max_tokens or len(seq.token_ids) >= self.max_context
        ):
            text += seq.finish("length")
        event = TokenEvent(seq.id, token, text, seq.exit, conf, seq.finish_reason)
        if seq.finish_reason is not None:
            self.release(seq)
        return event

    def abort(self, seq_id: str) -> None:
        seq = self.sequences.get(seq_id)
        if seq is not None and seq.status is not Status.FINISHED:
            seq.finish("abort")
            self.release(seq)

    def release(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.sequences.pop(seq.id, None)
