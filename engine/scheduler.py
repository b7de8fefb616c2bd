"""The scheduler: admission, the waiting and running queues, the batch of each step, and
per-token bookkeeping (stops, length, release). Pure Python: it never touches a tensor; the
model runner computes what `schedule` picks and the engine hands the sampled tokens back to
`emit`.

Batching policy (one, for every runner): every running sequence decodes its next token; then,
within the step's token budget and `max_batch` rows, waiting sequences prefill in chunks, oldest
first. A waiting sequence becomes running once its prompt is cached and its first token sampled.

KV pages (runners with a paged pool give an `engine.paging.BlockAllocator`): before a step each
running sequence gets the pages its next token needs; when the pool is short, the newest
sequence holding pages is preempted (its pages freed, it waits first in line and recomputes its
tokens later), as in vLLM. Prefill chunks shrink to the free pages. A request that could not fit
even alone in the whole pool is refused at admission (`Overloaded`).
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any

from ruyiflow.engine.batch import Work
from ruyiflow.engine.errors import InvalidRequest, Overloaded
from ruyiflow.engine.events import Confidence, Status, TokenEvent
from ruyiflow.engine.paging import BlockAllocator
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
        allocator: BlockAllocator | None = None,  # the runner's KV pages, when paged
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
        self.allocator = allocator
        self.num_preemptions = 0

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
        self.check_fits(seq, seq.exit)
        self.sequences[seq.id] = seq
        if seq.pending_tokens() and seq.cache.length < len(seq.token_ids) - 1:
            self.waiting.append(seq)
        else:
            seq.status = Status.RUNNING
            self.running.append(seq)

    def check_fits(self, seq: Sequence, exit_layer: int) -> None:
        """Refuse (Overloaded) a sequence whose longest context at `exit_layer` needs more KV
        pages than the whole pool has: it could never run to its end here."""
        if self.allocator is None:
            return
        remaining = seq.params.max_tokens - seq.num_generated
        longest = min(len(seq.token_ids) + remaining, self.max_context) - 1
        need = self.allocator.layout.blocks_for(exit_layer, longest)
        if need > self.allocator.num_blocks:
            raise Overloaded(
                f"{longest} positions at exit {exit_layer} need {need} KV pages; this node's "
                f"pool has {self.allocator.num_blocks}"
            )

    def start(self, seq: Sequence) -> None:
        """A waiting sequence whose cache holds all its tokens but the last runs from the next
        step (as after sampling its first token)."""
        if seq.status is Status.WAITING and seq.cache.length == len(seq.token_ids) - 1:
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)

    def restart(self, seq: Sequence, cache: Any) -> None:
        """Give `seq` a fresh cache (its pages freed) and send it back to prefill."""
        self._free(seq)
        seq.cache = cache
        self.requeue(seq)

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
        if self.allocator is not None:
            self._reserve_decode()
        for seq in self.running:
            works.append(Work(seq.cache, seq.pending_tokens(), seq.cache.length, seq.exit))
            seqs.append(seq)
            budget -= 1
        for seq in list(self.waiting):
            if budget <= 0 or len(seqs) >= self.max_batch:
                break
            pending = seq.pending_tokens()
            chunk = pending[: self._room(seq, min(budget, len(pending)))]
            if not chunk:
                break  # the pool is full: wait for pages (running sequences finish, or give way)
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
        self._free(seq)

    # -- KV pages ---------------------------------------------------------------------------
    def _free(self, seq: Sequence) -> None:
        if self.allocator is not None:
            seq.cache.release()

    def _reserve_decode(self) -> None:
        """Pages for every running sequence's next token, oldest first; when short, preempt the
        newest holder of pages (possibly the sequence itself, which then waits)."""
        free = self.allocator.num_free
        for seq in list(self.running):
            if seq.status is not Status.RUNNING:
                continue  # preempted for an older one in this loop
            length = seq.cache.length + 1
            need = seq.cache.num_needed(seq.exit, length)
            while need > free:
                victim = self._newest_holder()
                self._preempt(victim)
                free = self.allocator.num_free
                if victim is seq:
                    break
            else:
                seq.cache.ensure(seq.exit, length)
                free -= need

    def _newest_holder(self) -> Sequence:
        """The most recently queued sequence that holds pages: partly prefilled waiting ones
        (newest first), then running ones."""
        for seq in reversed(self.waiting):
            if seq.cache.num_blocks():
                return seq
        return self.running[-1]

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s pages; it recomputes its tokens when pages are free again."""
        seq.cache.release()
        self.num_preemptions += 1
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            seq.status = Status.WAITING
            self.waiting.appendleft(seq)

    def _give_way(self, seq: Sequence) -> int:
        """Nothing runs (so nothing will free pages) and `seq` cannot start: preempt waiting
        sequences queued after it that hold pages, newest first. Returns the free pages."""
        for other in reversed(list(self.waiting)):
            if other is seq:
                break
            if other.cache.num_blocks():
                self._preempt(other)
                if seq.cache.num_needed(seq.exit, seq.cache.length + 1) <= self.allocator.num_free:
                    break
        return self.allocator.num_free

    def _room(self, seq: Sequence, num_tokens: int) -> int:
        """How many of the next `num_tokens` tokens of `seq` the free pages can hold (taking
        them): all when unpaged or room enough, else the largest count that fits."""
        if self.allocator is None or num_tokens == 0:
            return num_tokens
        cache, free = seq.cache, self.allocator.num_free
        start = cache.length
        if not self.running and cache.num_needed(seq.exit, start + 1) > free:
            free = self._give_way(seq)
        if cache.num_needed(seq.exit, start + num_tokens) > free:
            low, high = 0, num_tokens  # largest fitting count: needs grow with the count
            while low < high:
                mid = (low + high + 1) // 2
                if cache.num_needed(seq.exit, start + mid) <= free:
                    low = mid
                else:
                    high = mid - 1
            num_tokens = low
        if num_tokens:
            cache.ensure(seq.exit, start + num_tokens)
        return num_tokens
