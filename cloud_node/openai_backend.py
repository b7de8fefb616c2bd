"""A node backend over an external OpenAI-compatible engine (vLLM, SGLang, llama.cpp server).

The servicer sees the same interface as our engine thread (`node.backend.NodeBackend`): a
request becomes a streamed `/v1/completions` call on an asyncio loop of its own, whose chunks
become `TokenEvent`s on the request's queue. The engine's health is polled (`/v1/models`, which
must list `served_model`); the node is SERVING only while the engine answers and its dialect
has been probed (`engine_probe`). Cancelling a request cancels its task, which closes the HTTP
connection, so the engine stops generating.

Moves: into this node in `tokens` mode only (a `hidden` state raises ModelMismatch ->
FAILED_PRECONDITION); out of it, when logprobs show low confidence and the model has a deeper
exit elsewhere, the request parks a `tokens` state (prompt + generated ids), as our engine does.

Without a local tokenizer the node works on text (`text_prompts`, `engine_requests`): what
needs token ids (token-id prompts, a `tokens` state, a move out) is refused by name or not done.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from ruyiflow.cloud_node.engine_client import EngineBusy, EngineClient, EngineUnreachable
from ruyiflow.cloud_node.engine_probe import EngineDialect, probe_engine
from ruyiflow.cloud_node.engine_requests import chat_request, completion_request
from ruyiflow.cloud_node.text_prompts import TextPrompts, check_text_only
from ruyiflow.cloud_node.token_stream import UNKNOWN_PIECE, Piece, TokenMapper, text_pieces
from ruyiflow.cluster.errors import (
    InvalidRequest,
    ModelMismatch,
    NodeUnavailable,
    RuyiflowError,
)
from ruyiflow.cluster.escalation import EscalationSettings
from ruyiflow.cluster.openai_types import Completion
from ruyiflow.cluster.topology import NodeSpec
from ruyiflow.engine.events import TokenEvent
from ruyiflow.engine.handoff import (
    HandoffState,
    ModelFacts,
    check_meta,
    encode_state,
    peek_metadata,
)
from ruyiflow.engine.sampling_params import SamplingParams
from ruyiflow.engine.tokenizer import Tokenizer
from ruyiflow.node.backend import (
    CONFIDENCE_LOGPROBS,
    CONFIDENCE_NONE,
    BackendFacts,
    Finished,
)
from ruyiflow.node.escalation import EscalationWatch
from ruyiflow.node.worker import PARK_SECONDS, Parked, RequestHandle

log = logging.getLogger(__name__)
HEALTH_INTERVAL_S = 1.0
HEALTH_TIMEOUT_S = 2.0
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}  # others count as stop


@dataclass
class _Job:
    handle: RequestHandle
    prompt_ids: list[int]
    prefix_ids: list[int]
    params: SamplingParams
    generated: list[int] = field(default_factory=list)


class OpenAIBackend:
    """`NodeBackend` + `HealthSource` for one engine; start() before use, stop() at the end."""

    def __init__(
        self,
        spec: NodeSpec,
        tokenizer: Tokenizer | None,
        model_exits: tuple[int, ...],
        fingerprint: str,
        api_key: str | None,
    ) -> None:
        self.spec = spec
        self.tokenizer = tokenizer
        self.mapper = TokenMapper(tokenizer) if tokenizer is not None else None
        self.text = TextPrompts() if tokenizer is None else None  # the servicer's, then
        self.exit = spec.exits[0]
        self.model_exits = model_exits
        self.fingerprint = fingerprint
        self.client = EngineClient(spec.base_url, api_key, spec.timeout_s, spec.engine_concurrency)
        self.dialect: EngineDialect | None = None
        self.is_up = False
        self._watchers: list[Callable[[bool], None]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="engine", daemon=True)
        self._slots: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._jobs: dict[str, _Job] = {}
        self._num_queued = 0
        self._last_progress = float("-inf")  # monotonic: the engine's last poll answer or chunk
        self._parked: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()

    # -- lifecycle and health -------------------------------------------------------------------
    def start(self) -> OpenAIBackend:
        self._thread.start()
        self._follower = asyncio.run_coroutine_threadsafe(self._follow_engine(), self._loop)
        return self

    def stop(self) -> None:
        async def close() -> None:
            self._follower.cancel()
            for task in list(self._tasks.values()):
                task.cancel()
            await self.client.close()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def watch(self, on_change: Callable[[bool], None]) -> None:
        self._watchers.append(on_change)
        on_change(self.is_up)

    def _set_up(self, is_up: bool, reason: str) -> None:
        if is_up == self.is_up:
            return
        self.is_up = is_up
        if is_up:
            log.info("engine at %s is up: %s", self.client.where, reason)
        else:
            log.warning("engine at %s is down: %s", self.client.where, reason)
        for on_change in self._watchers:
            on_change(is_up)

    async def _follow_engine(self) -> None:
        """Poll `/v1/models`; probe the engine each time it comes (back) up."""
        self._slots = asyncio.Semaphore(self.spec.engine_concurrency)
        while True:
            try:
                ids = await self.client.model_ids(HEALTH_TIMEOUT_S)
                self._last_progress = time.monotonic()
                if self.spec.served_model not in ids:
                    raise NodeUnavailable(f"it serves {ids}, not {self.spec.served_model!r}")
                if not self.is_up:
                    self.dialect = await probe_engine(
                        self.client, self.spec.served_model, self.tokenizer
                    )
                self._set_up(True, self.dialect.describe())
            except EngineBusy as exc:
                if not self._is_progressing():
                    self._set_up(False, str(exc))
            except RuyiflowError as exc:
                self._set_up(False, str(exc))
            await asyncio.sleep(HEALTH_INTERVAL_S)

    def _is_progressing(self) -> bool:
        """The engine answered a poll or sent a chunk within the read timeout: it is busy, not
        down. llama.cpp's server answers `/v1/models` only between two requests, so one busy
        with other clients' streams (or ours) stays up; one that accepts connections and then
        never answers goes down `timeout_s` after its last answer."""
        return time.monotonic() - self._last_progress < self.spec.timeout_s

    def facts(self) -> BackendFacts:
        """What Info reports: where confidence comes from and the prefill speed, both known
        once the engine was probed (an engine's shape is not ours to know)."""
        dialect = self.dialect
        if dialect is None:
            return BackendFacts(confidence="", prefill_tokens_per_s=0.0)
        confidence = CONFIDENCE_LOGPROBS if dialect.has_logprobs else CONFIDENCE_NONE
        return BackendFacts(
            confidence=confidence, prefill_tokens_per_s=dialect.prefill_tokens_per_s
        )

    # -- NodeBackend -------------------------------------------------------------------------
    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        exit_layer: int,
        escalation: EscalationSettings,
        prefix_ids: Sequence[int] = (),
    ) -> RequestHandle:
        if exit_layer != self.exit:
            raise InvalidRequest(f"exit {exit_layer} is not served by this node [{self.exit}]")
        if not self.is_up or self.dialect is None:
            raise NodeUnavailable(f"engine at {self.client.where} is not serving")
        if params.no_repeat_ngram_size:
            raise InvalidRequest("no_repeat_ngram_size is not supported by an external engine")
        if self.text is not None:
            check_text_only(self.spec.name, prompt_ids, prefix_ids, params.stop_token_ids)
        if len(prompt_ids) + params.max_tokens > self.spec.max_context:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceed "
                f"the node's max_context {self.spec.max_context}"
            )
        handle = RequestHandle(request_id, EscalationWatch(escalation))
        handle.watch.generated = len(prefix_ids)
        handle.seq_id = uuid.uuid4().hex
        job = _Job(handle, list(prompt_ids), list(prefix_ids), params)
        self._loop.call_soon_threadsafe(self._spawn, job)
        return handle

    def resume(
        self, request_id: str, data: bytes, exit_layer: int, escalation: EscalationSettings
    ) -> RequestHandle:
        meta = peek_metadata(data)
        if meta.get("mode") != "tokens":
            raise ModelMismatch(
                f"node {self.spec.name} (backend openai) takes only tokens-mode handoffs: hidden "
                "states and trunk KV cannot enter an external engine"
            )
        if self.tokenizer is None:
            raise ModelMismatch(
                f"node {self.spec.name} (backend openai) has no tokenizer: a tokens-mode "
                "state's token ids cannot be read there; moves into it carry prefix_text"
            )
        facts = ModelFacts(
            self.fingerprint, self.model_exits, self.tokenizer.vocab_size, self.spec.max_context,
            0, 0, 0,
        )  # fmt: skip
        state = check_meta(meta, facts)
        prompt = state.token_ids[: state.num_prompt_tokens]
        prefix = state.token_ids[state.num_prompt_tokens :]
        return self.generate(request_id, prompt, state.params, exit_layer, escalation, prefix)

    def cancel(self, handle: RequestHandle) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._cancel_task, handle.seq_id)

    def take_parked(self, handle: str, mode: str) -> bytes:
        """The parked state (always `tokens` mode: an engine has no hidden state to give)."""
        with self._lock:
            entry = self._parked.get(handle)
        if entry is None:
            raise InvalidRequest(f"no parked state {handle!r} (expired or never parked)")
        return entry[0]

    def load(self) -> tuple[int, int, int]:
        jobs = list(self._jobs.values())
        outstanding = sum(j.params.max_tokens - len(j.prefix_ids) - len(j.generated) for j in jobs)
        queued = self._num_queued
        return len(jobs) - queued, queued, outstanding

    # -- requests, on the loop ----------------------------------------------------------------
    def _spawn(self, job: _Job) -> None:
        seq_id = job.handle.seq_id
        self._jobs[seq_id] = job
        self._tasks[seq_id] = self._loop.create_task(self._run(job))

    def _cancel_task(self, seq_id: str | None) -> None:
        task = self._tasks.get(seq_id or "")
        if task is not None:
            task.cancel()

    async def _run(self, job: _Job) -> None:
        handle, is_queued = job.handle, True
        self._num_queued += 1
        try:
            async with self._slots:
                self._num_queued -= 1
                is_queued = False
                await self._stream(job)
        except asyncio.CancelledError:
            pass  # the client went away; nobody reads the queue any more
        except RuyiflowError as exc:
            if isinstance(exc, EngineUnreachable):
                self._set_up(False, str(exc))
            handle.items.put(exc)
            handle.items.put(None)
        except Exception as exc:  # a bug here fails the request, not the node
            log.exception("request %s failed", handle.request_id)
            handle.items.put(NodeUnavailable(f"engine request failed: {exc!r}"))
            handle.items.put(None)
        finally:
            self._num_queued -= is_queued
            self._tasks.pop(handle.seq_id, None)
            self._jobs.pop(handle.seq_id, None)

    async def _stream(self, job: _Job) -> None:
        if self.text is not None:
            return await self._stream_text(job)
        p = job.params
        ids = job.prompt_ids + job.prefix_ids
        prompt = ids if self.dialect.accepts_token_ids else self.tokenizer.decode(ids)
        request = completion_request(
            self.spec.served_model, prompt, p, p.max_tokens - len(job.prefix_ids), self.dialect
        )
        await self._stream_ids(job, self.client.stream_completion(request))

    async def _stream_ids(self, job: _Job, chunks: AsyncIterator[Completion]) -> None:
        handle = job.handle
        async for chunk in chunks:
            self._last_progress = time.monotonic()
            if not chunk.choices:
                continue  # a usage-only chunk
            choice = chunk.choices[0]
            pieces = self.mapper.pieces(choice)
            finish = _FINISH.get(choice.finish_reason, "stop") if choice.finish_reason else None
            for i, piece in enumerate(pieces):
                job.generated.append(piece.token_id)
                reason = "stop" if piece.token_id in job.params.stop_token_ids else None
                reason = reason or (finish if i == len(pieces) - 1 else None)
                handle.items.put(self._event(handle, piece, reason))
                if reason is not None:
                    handle.items.put(None)
                    return
                if self._escalates(job, piece):
                    return
            if finish is not None:  # the engine's last chunk carries no token
                handle.items.put(Finished(finish))
                handle.items.put(None)
                return
        raise NodeUnavailable(f"engine at {self.client.where} ended the stream without a reason")

    async def _stream_text(self, job: _Job) -> None:
        """A request on a node without a tokenizer: one event per engine token, then as many
        id-less empty tokens as the engine's `usage` counts beyond those (chunks without
        logprobs holding several tokens), so offsets and counts are the engine's."""
        handle, p = job.handle, job.params
        prompt, prefix = self.text.decode(job.prompt_ids), self.text.decode(job.prefix_ids)
        chat, model = self.text.chat_of(prompt), self.spec.served_model
        max_tokens = p.max_tokens - len(job.prefix_ids)
        if chat is not None:
            request = chat_request(model, chat, prefix, p, max_tokens, self.dialect)
            chunks = self.client.stream_chat(request)
        else:
            request = completion_request(
                model, prompt + prefix, p, max_tokens, self.dialect, with_usage=True
            )
            chunks = self.client.stream_completion(request)
        finish, num_tokens = None, 0
        async for chunk in chunks:
            self._last_progress = time.monotonic()
            if chunk.usage is not None:
                num_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices[:1]:
                for piece in text_pieces(choice):
                    job.generated.append(piece.token_id)
                    handle.items.put(self._event(handle, piece, None))
                finish = finish or choice.finish_reason
        if finish is None:
            where = self.client.where
            raise NodeUnavailable(f"engine at {where} ended the stream without a reason")
        for _ in range(num_tokens - len(job.generated)):
            job.generated.append(UNKNOWN_PIECE.token_id)
            handle.items.put(self._event(handle, UNKNOWN_PIECE, None))
        handle.items.put(Finished(_FINISH.get(finish, "stop")))
        handle.items.put(None)

    def _event(self, handle: RequestHandle, piece: Piece, reason: str | None) -> TokenEvent:
        return TokenEvent(
            handle.seq_id, piece.token_id, piece.text, self.exit, piece.confidence, reason
        )

    def _escalates(self, job: _Job, piece: Piece) -> bool:
        """Park the request when its confidence says so and a deeper exit exists."""
        if not self.dialect.has_logprobs:
            return False
        watch = job.handle.watch
        reason = watch.observe(piece.confidence.max_prob)
        target = watch.target_exit(self.exit, self.model_exits) if reason else None
        if target is None:
            return False
        ids = job.prompt_ids + job.prefix_ids + job.generated
        state = HandoffState(
            mode="tokens",
            fingerprint=self.fingerprint,
            exit=self.exit,
            token_ids=ids,
            num_prompt_tokens=len(job.prompt_ids),
            params=job.params,
            seed=job.params.seed or 0,
            num_emitted_chars=len(self.tokenizer.decode(job.prefix_ids + job.generated)),
            dtype="F32",
        )
        data = encode_state(state)
        parked = Parked(self._park(data), self.exit, target, reason, len(data), len(ids))
        job.handle.items.put(parked)
        job.handle.items.put(None)
        return True

    def _park(self, data: bytes) -> str:
        handle, now = uuid.uuid4().hex, time.monotonic()
        with self._lock:
            for key in [k for k, (_, t) in self._parked.items() if t < now]:
                del self._parked[key]
            self._parked[handle] = (data, now + PARK_SECONDS)
        return handle
