"""The engine: continuous batching over a FamilyModel (PyTorch; queues and bookkeeping are
`engine.scheduler.Scheduler`'s).

A step is schedule -> run -> postprocess. Scheduling packs every running sequence's next token
and, within the step's token budget, prefill chunks of waiting ones into one forward call, so
sequences join and leave between any two steps. Sequences at different exits share the call.
"""

from __future__ import annotations

import torch
from ruyiflow.engine.checkpoint import LoadedModel
from ruyiflow.engine.errors import HandoffError
from ruyiflow.engine.handoff import HandoffState, decode_state, encode_state
from ruyiflow.engine.model import Work
from ruyiflow.engine.sampling import draw, make_generator, process_row
from ruyiflow.engine.scheduler import Scheduler
from ruyiflow.engine.sequence import Confidence, Sequence, Status, TokenEvent
from ruyiflow.kernels import exit_confidence


class Engine(Scheduler):
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
        self.fingerprint = loaded.fingerprint
        self._init_queues(max_batch, max_context, max_step_tokens, max_waiting)

    def _new_cache(self):
        return self.model.new_cache()

    def _new_generator(self, seed: int | None) -> tuple[torch.Generator, int]:
        return make_generator(seed)

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
            if seq.params.needs_row_processing:
                token = draw(
                    process_row(row, seq.params, seq.token_ids, seq.ngrams),
                    seq.params,
                    seq.generator,
                )
            else:
                token = greedy[k]
            conf = Confidence(float(max_prob[k]), float(margin[k]), float(entropy[k]))
            events.append(self._emit(seq, token, conf))
        return events

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
        seq = self._exportable(seq_id, mode)
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

    # -- facts for the serving layer -------------------------------------------------------------
    @property
    def state_dtype_bytes(self) -> int:
        """Bytes per element of exported hidden states and KV."""
        return self.model.embed.element_size()

    def _prefill_once(self, exit_layer: int, ids: list[int]) -> None:
        self.model.forward([Work(self.model.new_cache(), ids, 0, exit_layer)])
